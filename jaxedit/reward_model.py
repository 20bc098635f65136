"""Train and score HIVE's reward model on ranked edits (`jaxedit.data.rankings` JSONL files).

    python -m jaxedit.reward_model train --data=rankings.jsonl --init=BLIP_DIR --out=rm/ --steps=2000
    python -m jaxedit.reward_model score --model=rm/ --data=val.jsonl [--out=rewards.jsonl]
    python -m jaxedit.reward_model score --model=rm/ --triples=train.jsonl --out=train_rewards.jsonl

train: ``--init`` is ``tiny`` (a small random model), a transformers BLIP image-text matching
folder (`EditRewardModel.from_blip`) or a saved reward model. AdamW (paper: lr 1e-4, weight decay
0.05; constant lr) on the Bradley-Terry loss over all ordered pairs of ``--batch`` rankings per
step; only the final layers train (``--train_text_layers``, ``--train_vision_layers``; paper: 1
and 1). Rankings are drawn from per-epoch permutations fixed by ``--seed``, so the data order
depends only on the step. A ``--val_fraction`` of the rankings (random, seeded) is held out; its
pairwise accuracy is logged every ``--eval_every`` steps and at the end (chance = 0.5).
Every ``--save_every`` steps and at the end, ``--out`` gets the reward model (`EditRewardModel.save`)
and ``train_state.pt`` (step, optimizer, the trainable parameters, RNG). A run whose ``--out``
holds a train_state.pt resumes from it (``--init`` is then ignored): the frozen parameters are
read from the saved model, the trainable ones from train_state.pt, which is replaced atomically,
so a run killed at any moment resumes from its last checkpoint.

score: per-edit rewards (printed, or written as JSONL with ``--out``) and the pairwise accuracy.
With ``--triples`` (a triples JSONL with ``"output"``s, `jaxedit.data.instructions`) instead of
``--data``: the reward R(input, instruction, output) of every triple, written to ``--out`` as
the same triples with a ``"reward"`` field (paths relative to ``--out``'s folder): the input of
HIVE's reward fine-tuning (`configs/hive_weighted.py`, `configs/hive_condition.py`).

PyTorch side: never imports jax.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from jaxedit.data import rankings as rk

STATE = "train_state.pt"


class ImageCache:
    """uint8 images resized to the model's size, by path (at most `size` of them kept)."""

    def __init__(self, image_size: int, size: int = 2048):
        self.image_size, self.size, self._d = image_size, size, {}

    def ranking(self, r: rk.Ranking) -> tuple[np.ndarray, list[np.ndarray]]:
        from jaxedit.scorers.reward_model import resize
        paths = [r.input, *r.edits]
        if all(p in self._d for p in paths):
            return self._d[r.input], [self._d[p] for p in r.edits]
        inp, edits = rk.load_images(r)
        images = [resize(im, self.image_size) for im in [inp, *edits]]
        if len(self._d) + len(paths) <= self.size:
            self._d.update(zip(paths, images))
        return images[0], images[1:]


def make_batch(model, rankings: list[rk.Ranking], cache: ImageCache):
    """Tensors for `model.forward` and the ranks padded to (N, K_max) with 0."""
    import torch
    from jaxedit.scorers.reward_model import normalize
    loaded = [cache.ranking(r) for r in rankings]
    ids, mask = model.tokenize([r.instruction for r in rankings])
    group = torch.tensor([n for n, r in enumerate(rankings) for _ in r.edits])
    ranks = torch.zeros(len(rankings), max(len(r.edits) for r in rankings), dtype=torch.long)
    for n, r in enumerate(rankings):
        ranks[n, :len(r.ranks)] = torch.tensor(r.ranks)
    return (normalize(np.stack([inp for inp, _ in loaded])), ids, mask,
            normalize(np.stack([e for _, edits in loaded for e in edits])), group), ranks


def padded_rewards(flat, rankings):
    """Flat rewards (M,) in `make_batch` order -> (N, K_max), padding 0."""
    import torch
    out = flat.new_zeros(len(rankings), max(len(r.edits) for r in rankings))
    rows = torch.tensor([n for n, r in enumerate(rankings) for _ in r.edits])
    cols = torch.tensor([k for r in rankings for k in range(len(r.edits))])
    return out.index_put((rows, cols), flat)


def rewards_of(model, rankings, cache: ImageCache, batch: int = 16) -> list[np.ndarray]:
    """Per ranking, the rewards of its edits (float32)."""
    import torch
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(rankings), batch):
            chunk = rankings[i:i + batch]
            tensors, _ = make_batch(model, chunk, cache)
            flat = model(*tensors).float().cpu().numpy()
            splits = np.cumsum([len(r.edits) for r in chunk])[:-1]
            out += [x.astype(np.float32) for x in np.split(flat, splits)]
    model.train(was_training)
    return out


def accuracy(model, rankings, cache, batch: int = 16) -> tuple[float, int]:
    return rk.pairwise_accuracy(rewards_of(model, rankings, cache, batch), [r.ranks for r in rankings])


def split(rankings: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `val_fraction` of the rankings (at least one when > 0 and
    there are >= 2 rankings) is held out."""
    n_val = int(round(len(rankings) * val_fraction))
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(rankings) - 1)
    order = np.random.default_rng(seed).permutation(len(rankings))
    val = set(order[:n_val].tolist())
    return [r for i, r in enumerate(rankings) if i not in val], [r for i, r in enumerate(rankings) if i in val]


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """The rankings of `step`: positions step*batch ... of the concatenated per-epoch permutations."""
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[k]))
    return out


def _init_model(init: str, seed: int, layers: dict):
    from jaxedit.scorers.reward_model import EditRewardModel
    if init == "tiny":
        return EditRewardModel.tiny(seed=seed, **layers)
    if EditRewardModel.read_config(init) is not None:
        model = EditRewardModel.load(init)
        if layers:
            model.set_trainable(layers.get("train_text_layers", model.train_text_layers),
                                layers.get("train_vision_layers", model.train_vision_layers))
        return model
    if not os.path.isdir(init):
        raise ValueError(f"--init {init!r}: expected 'tiny', a BLIP folder or a saved reward model")
    return EditRewardModel.from_blip(init, seed=seed, **layers)


def _save(model, optimizer, step: int, out: str, args: dict) -> None:
    import torch
    model.save(out, extra={"step": step})
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "args": args,
             "trainable": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}}
    tmp = os.path.join(out, ".partial-" + STATE)
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out, STATE))


def train(data: str, init: str, out: str, steps: int, *, lr: float = 1e-4, weight_decay: float = 0.05,
          batch: int = 8, seed: int = 0, val_fraction: float = 0.1, save_every: int = 500, eval_every: int = 500,
          train_text_layers: int | None = None, train_vision_layers: int | None = None, device: str = "cpu",
          cache_images: int = 2048, log=print) -> dict:
    """Trains to `steps` total steps (resuming from `out`); returns {"step", "loss", "val_accuracy", "val_pairs"}."""
    import torch
    from jaxedit.scorers.reward_model import EditRewardModel, bradley_terry_loss
    rankings = rk.read_rankings(data)
    train_set, val_set = split(rankings, val_fraction, seed)
    args = {"data": os.path.abspath(data), "lr": lr, "weight_decay": weight_decay, "batch": batch, "seed": seed,
            "val_fraction": val_fraction}
    state_path = os.path.join(out, STATE)
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=True)
        model = EditRewardModel.load(out)  # its trainable layers as saved; --train_*_layers are ignored
        if sorted(state["trainable"]) != sorted(model.trainable_names()):
            raise ValueError(f"{state_path}: its trainable parameters differ from the saved model's")
        if any(state["args"][k] != args[k] for k in ("seed", "val_fraction")):
            log(f"warning: resuming with different seed/val_fraction than {state['args']}")
        model.load_state_dict(state["trainable"], strict=False)
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        log(f"resumed from {out} at step {step}")
    else:
        layers = {k: v for k, v in (("train_text_layers", train_text_layers),
                                    ("train_vision_layers", train_vision_layers)) if v is not None}
        model, step, state = _init_model(init, seed, layers), 0, None
        torch.manual_seed(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    log(f"{len(train_set)} training rankings ({sum(len(r.pairs()) for r in train_set)} pairs), {len(val_set)} "
        f"held out; {sum(p.numel() for p in params)} of {sum(p.numel() for p in model.parameters())} parameters train")
    cache = ImageCache(model.image_size, cache_images)
    result = {"step": step, "loss": float("nan"), "val_accuracy": float("nan"), "val_pairs": 0}
    if step >= steps:
        log(f"nothing to do: {out} is at step {step} >= --steps {steps}")
    t0 = time.time()
    while step < steps:
        chunk = [train_set[i] for i in batch_indices(step, len(train_set), batch, seed)]
        tensors, ranks = make_batch(model, chunk, cache)
        loss = bradley_terry_loss(padded_rewards(model(*tensors), chunk), ranks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        result.update(step=step, loss=loss.item())
        done = step == steps
        if val_set and (step % eval_every == 0 or done):
            result["val_accuracy"], result["val_pairs"] = accuracy(model, val_set, cache)
            log(f"step {step}: loss {loss.item():.4f}, held-out pairwise accuracy {result['val_accuracy']:.3f} "
                f"({result['val_pairs']} pairs, chance 0.5), {time.time() - t0:.1f}s")
        if step % save_every == 0 or done:
            _save(model, optimizer, step, out, args)
    return result


def score(model_dir: str, data: str, out: str | None = None, batch: int = 16, device: str = "cpu",
          log=print) -> dict:
    """Rewards of every edit of `data` and the pairwise accuracy; returns {"accuracy", "pairs", "rewards"}."""
    from jaxedit.scorers.reward_model import EditRewardModel
    model = EditRewardModel.load(model_dir, device=device)
    rankings = rk.read_rankings(data)
    rewards = rewards_of(model, rankings, ImageCache(model.image_size), batch)
    acc, n = rk.pairwise_accuracy(rewards, [r.ranks for r in rankings])
    rows = [{"line": r.line, "input": r.input, "instruction": r.instruction, "edits": list(r.edits),
             "ranks": list(r.ranks), "rewards": [float(x) for x in rew]} for r, rew in zip(rankings, rewards)]
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        for row in rows:
            for e, k, x in zip(row["edits"], row["ranks"], row["rewards"]):
                log(f"line {row['line']}\t{e}\trank {k}\treward {x:.6f}")
    log(f"pairwise accuracy {acc:.4f} over {n} pairs (chance 0.5)")
    return {"accuracy": acc, "pairs": n, "rewards": rewards}


def score_triples(model_dir: str, triples: str, out: str, batch: int = 16, device: str = "cpu",
                  log=print) -> np.ndarray:
    """Rewards (float32) of every (input, instruction, output) of a triples JSONL file, written
    to ``out`` as the same triples with a "reward" field."""
    import dataclasses
    from jaxedit.data.images import read_image
    from jaxedit.data.instructions import triples_records, write_triples_jsonl
    from jaxedit.scorers.reward_model import EditRewardModel
    records = triples_records(triples, with_outputs=True)
    model = EditRewardModel.load(model_dir, device=device)
    rewards = []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        rewards.append(model.score([read_image(r.input) for r in chunk], [r.instruction for r in chunk],
                                   [read_image(r.output) for r in chunk], batch_size=batch))
    rewards = np.concatenate(rewards).astype(np.float32)
    write_triples_jsonl(out, [dataclasses.replace(r, reward=float(x)) for r, x in zip(records, rewards)])
    log(f"{out}: {len(records)} triples, reward mean {rewards.mean():.4f}, std {rewards.std():.4f}")
    return rewards


def _flags():
    """A fresh set of flags (not absl's global FLAGS, so `main` can be called more than once)."""
    from absl import flags
    fv = flags.FlagValues()
    flags.DEFINE_string("data", None, "rankings JSONL (jaxedit.data.rankings).", flag_values=fv)
    flags.DEFINE_string("init", "tiny", "train: 'tiny', a BLIP ITM folder, or a saved reward model.", flag_values=fv)
    flags.DEFINE_string("out", None, "train: output/checkpoint folder; score: optional rewards JSONL.", flag_values=fv)
    flags.DEFINE_string("model", None, "score: a saved reward model folder.", flag_values=fv)
    flags.DEFINE_string("triples", None, "score: a triples JSONL with outputs to score instead of --data "
                        "(writes them with a 'reward' to --out).", flag_values=fv)
    flags.DEFINE_integer("steps", 1000, "train: total optimizer steps.", flag_values=fv)
    flags.DEFINE_float("lr", 1e-4, "train: AdamW learning rate (paper: 1e-4).", flag_values=fv)
    flags.DEFINE_float("weight_decay", 0.05, "train: AdamW weight decay (paper: 0.05).", flag_values=fv)
    flags.DEFINE_integer("batch", 8, "rankings per step (train) / per forward (score).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the model init, held-out split and data order.", flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.1, "train: fraction of rankings held out.", flag_values=fv)
    flags.DEFINE_integer("save_every", 500, "train: checkpoint every N steps.", flag_values=fv)
    flags.DEFINE_integer("eval_every", 500, "train: held-out accuracy every N steps.", flag_values=fv)
    flags.DEFINE_integer("train_text_layers", None, "train: last N text-encoder layers train (default 1).",
                         flag_values=fv)
    flags.DEFINE_integer("train_vision_layers", None, "train: last N vision layers train (default 1).",
                         flag_values=fv)
    flags.DEFINE_integer("cache_images", 2048, "train: images kept in memory, resized (0.44 MB each at 384 px).",
                         flag_values=fv)
    flags.DEFINE_string("device", "cpu", "torch device.", flag_values=fv)
    return fv


def main(argv) -> int:
    """`main(["prog", "train", "--data=...", ...])`; returns the exit code."""
    from absl import flags
    fv = _flags()
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\nflags:\n" + fv.get_help())
        return 0
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(rest) != 2 or rest[1] not in ("train", "score"):
        print("usage: python -m jaxedit.reward_model {train,score} --data=... (train: --out; score: --model)",
              file=sys.stderr)
        return 2
    command = rest[1]
    need = ("data", "out") if command == "train" else (("triples", "model", "out") if fv.triples else ("data", "model"))
    missing = [n for n in need if not fv[n].value]
    if missing:
        print(f"error: {command} needs --{' --'.join(missing)}", file=sys.stderr)
        return 2
    try:
        if command == "train":
            train(fv.data, fv.init, fv.out, fv.steps, lr=fv.lr, weight_decay=fv.weight_decay, batch=fv.batch,
                  seed=fv.seed, val_fraction=fv.val_fraction, save_every=fv.save_every, eval_every=fv.eval_every,
                  train_text_layers=fv.train_text_layers, train_vision_layers=fv.train_vision_layers,
                  device=fv.device, cache_images=fv.cache_images)
        elif fv.triples:
            score_triples(fv.model, fv.triples, fv.out, batch=fv.batch, device=fv.device)
        else:
            score(fv.model, fv.data, fv.out, batch=fv.batch, device=fv.device)
    except (ValueError, OSError) as e:  # RankingError, bad checkpoint folder, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
