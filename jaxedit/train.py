"""RL fine-tuning of an editing model: D3PO with AI feedback (Image-Editing Specialists) or PPO
with a cross-attention reward (InstructRL4Pix), chosen by ``config.method``.

    python -m jaxedit.train --config=configs/d3po_snow.py:tiny          # embedded tiny RANDOM model
    python -m jaxedit.train --config=configs/d3po_snow.py --config.model.checkpoint=/data/ip2p \
        --config.data.images=DIR --config.data.masks=DIR --config.data.styles=DIR
    python -m jaxedit.train --config=configs/ppo_instructrl4pix.py --config.model.checkpoint=/data/ip2p \
        --config.data.instructions=/data/MagicBrush/train

One loop for both (`jaxedit.trainers`): each update collects a batch from the policy (sampling,
scoring or rewards) and takes the method's step(s). The whole state (params, optimizer, step,
data position, the method's own state such as PPO's stat tracker, config) is checkpointed every
`checkpoint.every` updates and on SIGTERM; a killed run resumes from the newest checkpoint in
`workdir` (`--config.resume`, on by default).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from jaxedit import parallel
from jaxedit.checkpoint import Checkpointer
from jaxedit.data import loader as data_loader
from jaxedit.data import scenes
from jaxedit.data.instructions import build_instruction_index
from jaxedit.logging import RunLogger, image_grid
from jaxedit.models import lora, style_adapter
from jaxedit.models.tiny import make_tiny_checkpoint
from jaxedit.pipeline import EditPipeline
from jaxedit.rl.update import init_train_state
from jaxedit.scorers.base import InProcessQueue, make_scorer
from jaxedit.scorers.shm_queue import ScorerClient
from jaxedit.trainers import METHODS
from jaxedit.trainers.common import to_host


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite updates in a row)."""


@dataclasses.dataclass
class Policy:
    """What is trained and how it becomes denoiser params: full fine-tuning or LoRA.

    trainable: the optimised tree; ref_params: the frozen initial denoiser params (the reference
    policy); merge(trainable, ref_params) -> denoiser params (None = trainable is the params).
    """
    trainable: Any
    ref_params: Any
    merge: Any = None

    def params(self, trainable) -> Any:
        return trainable if self.merge is None else self.merge(trainable, self.ref_params)


def host_dir(workdir: str, name: str) -> str:
    """A folder of ``workdir`` this host writes alone (``name-host{i}`` in a multi-host run): the
    generated data and the tiny checkpoint are deterministic, so each host writes its own copy
    instead of racing the others on a shared file system."""
    return os.path.join(workdir, name if jax.process_count() == 1 else f"{name}-host{jax.process_index()}")


def build_pipeline(config, workdir: str) -> EditPipeline:
    """The editing model: the configured checkpoint (or the tiny random one) + style adapter."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
    path = config.model.checkpoint or make_tiny_checkpoint(host_dir(workdir, "tiny-ip2p"))
    pipe = EditPipeline.from_pretrained(path, dtype=dtype, remat=config.model.remat)
    if config.model.style_adapter and not pipe.style:
        cfg = style_adapter.Config(dim=config.model.adapter_dim, heads=config.model.adapter_heads,
                                   cross_attention_dim=pipe.text_encoder.config.hidden_size)
        # Deterministic from the seed, so a resumed run rebuilds the same reference policy.
        pipe = pipe.with_style_adapter(cfg, key=jax.random.key(config.seed))
    return pipe


def build_policy(config, pipe: EditPipeline) -> Policy:
    base = pipe.denoiser_params
    if config.train.mode == "full":
        return Policy(base, base)
    if config.train.mode != "lora":
        raise ValueError(f"train.mode={config.train.mode!r}: expected 'full' or 'lora'")
    unet = base["unet"] if pipe.style else base
    trainable = {"lora": lora.init_lora(unet, rank=config.train.lora_rank, key=jax.random.key(config.seed + 1))}
    if pipe.style:  # the new adapter and conv_in channels must learn too, or the style has no effect
        trainable.update(style_adapter=base["style_adapter"], conv_in=base["unet"]["conv_in"])
    scale = lora.lora_scale(config.train.lora_rank, config.train.lora_alpha)

    def merge(t, ref):
        if not pipe.style:
            return lora.merge(ref, t["lora"], scale)
        u = {**lora.merge(ref["unet"], t["lora"], scale), "conv_in": t["conv_in"]}
        return {"unet": u, "style_adapter": t["style_adapter"]}
    return Policy(trainable, base, merge)


def build_data(config, workdir: str, batch_size: int, *, heldout: bool = False):
    """The training loader (shuffled, endless) or, with ``heldout``, one ordered pass over the
    held-out examples (``eval.*``; generated ones use another seed than the training ones).
    D3PO: images, masks, style images; PPO: an instruction dataset (MagicBrush folder or triples
    JSONL, `jaxedit.data.instructions`); sft: triples with their edited images (and rewards).
    ``batch_size``: examples per host and call."""
    src, seed, folder = (config.eval, config.seed + 10_000, "heldout") if heldout else (config.data, config.seed, "data")
    folder = host_dir(workdir, folder)
    what = "eval" if heldout else "data"
    common = dict(resolution=config.data.resolution, batch_size=batch_size, seed=seed, shuffle=not heldout,
                  num_epochs=1 if heldout else None, worker_count=config.data.worker_count,
                  host_index=jax.process_index(), host_count=jax.process_count())
    if config.method == "sft":  # triples with edited images (+ rewards): `jaxedit.trainers.sft.build_data`
        from jaxedit.trainers import sft
        return sft.build_data(config, src, folder, heldout=heldout, **common)
    if config.method == "ppo":
        source = src.instructions
        if src.generate:
            source = scenes.write_triples(folder, src.generate, seed=seed,
                                          size=config.data.resolution)
        elif not source:
            raise ValueError(f"set --config.{what}.instructions (a MagicBrush folder or triples .jsonl) "
                             f"or --config.{what}.generate=N")
        return data_loader.make_loader(index=build_instruction_index(source, max_bad_files=config.data.max_bad_files),
                                       **common)
    if src.generate:
        folders = scenes.write_dataset(folder, src.generate, config.data.generate_styles,
                                       style=config.edit.style, seed=seed, size=config.data.resolution)
        images, masks, styles = folders["images"], folders["masks"], folders["styles"]
    else:
        images, masks, styles = src.images, src.masks, config.data.styles
        if not images or not styles:
            raise ValueError(f"set --config.{what}.images and --config.data.styles (or --config.{what}.generate=N)")
    if not config.edit.segment:
        masks = None  # whole-frame edit
    return data_loader.make_loader(images, styles, masks or None, max_bad_files=config.data.max_bad_files, **common)


#: Sub-folders of ``score.models`` with the paper's scorers (local copies of the checkpoints).
PAPER_SCORERS = {"depth_weights": "depth-anything-v2-small",   # transformers format (…-Small-hf)
                 "embed_weights": "dreamsim",                  # DreamSim's checkpoint folder (`scorers.dreamsim`)
                 "grounding_dino": "grounding-dino-tiny",      # transformers format
                 "sam": "sam-vit-base"}                        # transformers format (SamModel or Sam2Model)


def scorer_kwargs(config) -> tuple[str, dict, bool]:
    """(scorer name, its keyword arguments, whether it must run in the scorer process)."""
    sc = config.score
    kwargs, name, process = {"lam": sc.lam}, sc.scorer, sc.process
    segment_weights = sc.segment_weights
    if sc.models:  # the paper's scorers: depth + Grounded-SAM masks + DreamSim
        paths = {k: os.path.join(sc.models, v) for k, v in PAPER_SCORERS.items()}
        missing = [p for p in paths.values() if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"score.models={sc.models}: missing {', '.join(missing)} (expected sub-folders: "
                             f"{', '.join(PAPER_SCORERS.values())})")
        name, process = "specialist", True
        kwargs.update(structural="depth", depth_weights=paths["depth_weights"], semantic="dreamsim",
                      embed_weights=paths["embed_weights"])
        segment_weights = f"{paths['grounding_dino']},{paths['sam']}"
    elif name == "specialist":
        kwargs.update(structural=sc.structural, depth_weights=sc.depth_weights, semantic=sc.semantic,
                      embed_weights=sc.embed_weights)
    if segment_weights:
        if name != "specialist":
            raise ValueError("score.segment_weights needs score.scorer='specialist' (or score.models)")
        if not config.edit.segment:
            raise ValueError("score.segment_weights is set but edit.segment (the text prompt) is empty")
        kwargs.update(segment=config.edit.segment, segment_weights=segment_weights,
                      segment_style=sc.segment_style, segment_fallback=sc.segment_fallback)
    return name, kwargs, process


def build_scorer(config):
    """The configured scorer behind ``submit``/``result``: in this process, or in the scorer
    process over shared memory (``score.process``; ``score.address`` = a server already running)."""
    name, kwargs, process = scorer_kwargs(config)
    if not process:
        return InProcessQueue(make_scorer(name, **kwargs))
    command = None if config.score.address else [
        sys.executable, "-m", "jaxedit.scorers.server", f"--scorer={name}",
        f"--kwargs={json.dumps(kwargs)}", f"--threads={config.score.threads}"]
    return ScorerClient(command, address=config.score.address or None, slots=config.score.slots,
                        slot_bytes=config.score.slot_mb << 20, timeout=config.score.timeout_s,
                        restart=config.score.restart)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW after global-norm clipping of the update's accumulated gradient (as reference D3PO);
    method sft: + the EMA of the weights in the optimizer state (``hive.ema_decay`` > 0)."""
    opt = optax.chain(optax.clip_by_global_norm(config.train.max_grad_norm),
                      optax.adamw(config.train.lr, config.train.adam_b1, config.train.adam_b2,
                                  weight_decay=config.train.weight_decay))
    if config.method == "sft" and config.hive.ema_decay > 0:
        from jaxedit.rl.hive import ema_weights
        opt = optax.chain(opt, ema_weights(config.hive.ema_decay, warmup=config.hive.ema_warmup))
    return opt


def train(config, *, log=print, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the configured training; returns the last update's metrics.

    `stop_after` ends the run after that many updates in this process (tests of resumption).
    """
    if config.distributed:
        jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: coordinates are auto-detected
    if config.method not in METHODS:
        raise ValueError(f"method={config.method!r}: expected one of {sorted(METHODS)}")
    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.mesh_from_config(config)
    fsdp = lambda tree: parallel.shard(tree, mesh, min_size=config.mesh.min_shard_size)

    pipe = build_pipeline(config, workdir)
    policy = build_policy(config, pipe)
    pipe = dataclasses.replace(pipe, vae_params=parallel.replicate(pipe.vae_params, mesh))
    policy = dataclasses.replace(policy, ref_params=fsdp(policy.ref_params))
    optimizer = make_optimizer(config)
    scorer = build_scorer(config) if config.method == "d3po" else None  # (a process, maybe) stopped in `finally`
    try:
        method = METHODS[config.method](config, pipe, policy, mesh, optimizer, scorer)
        per_host = method.examples_per_call // jax.process_count()
        loader = build_data(config, workdir, per_host)
        heldout_loader = build_data(config, workdir, per_host, heldout=True) if config.eval.every else None
        heldout = list(heldout_loader) if heldout_loader else []
        if config.eval.every and not heldout:
            raise ValueError(f"eval: fewer held-out examples than the {method.examples_per_call} of one sampling call")
    except BaseException:
        scorer and scorer.close()
        raise
    state = fsdp(init_train_state(policy.trainable, optimizer))  # restores keep these shardings (any mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    start = 0
    if config.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        loader.set_state(meta["data"])
        method.set_state(meta.get("method", {}))
        start = meta["update"]
        log(f"resumed from update {start} ({ckpt.directory})")
    bar = tqdm(total=config.train.updates, initial=start, unit="update", desc=config.method.upper(),
               disable=None if config.log.progress else True)  # None: only on a terminal
    echo = bar.write if not bar.disable and log is print else log
    logger = RunLogger(workdir, tensorboard=config.log.tensorboard, enabled=jax.process_index() == 0, echo=echo)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    base_key = jax.random.key(config.seed)
    nonfinite, metrics = 0, {}

    def save(step):
        ckpt.save(step, state, {"update": step, "data": loader.get_state(), "method": method.get_state(),
                                "config": json.loads(config.to_json())})

    def model_params(state):  # what is evaluated and saved: the method's choice (sft: the EMA) or the trained tree
        pick = getattr(method, "model_trainable", None)
        return policy.params(pick(state) if pick else state.params)

    def evaluate(state) -> dict:  # the same held-out examples and noise every time
        return method.evaluate(model_params(state), heldout, heldout_loader.index,
                               jax.random.key(config.seed + 10_000))

    try:
        if heldout and start == 0:
            logger.scalars(0, evaluate(state), echo=bar.disable)
        for u in range(start, config.train.updates):
            key = jax.random.fold_in(base_key, u)
            t0 = time.perf_counter()
            ph = method.collect(policy.params(state.params), loader, key)
            t_sample = time.perf_counter() - t0
            t1 = time.perf_counter()
            state, m, skipped = method.update(state, policy.ref_params, ph, jax.random.fold_in(key, 1_000_000))
            t_update = time.perf_counter() - t1
            nonfinite = nonfinite + 1 if skipped else 0
            if nonfinite >= config.train.max_nonfinite:
                raise TrainingError(f"{nonfinite} updates in a row had a non-finite loss or gradient; "
                                    f"stopping (last good state is in {ckpt.directory})")
            if nonfinite:
                echo(f"warning: update {u + 1} skipped: non-finite loss or gradient ({nonfinite} in a row)")
            metrics = {**m, **ph["metrics"], "time/sample_s": t_sample, "time/update_s": t_update,
                       "time/samples_per_s": config.train.samples_per_update / t_sample}
            done = u + 1
            if heldout and (done % config.eval.every == 0 or done == config.train.updates):
                metrics.update(evaluate(state))
            bar.update(1)
            bar.set_postfix(**method.postfix(m), **ph["postfix"])
            if done % config.log.every == 0:
                logger.scalars(done, metrics, echo=bar.disable)
            if config.log.images_every and done % config.log.images_every == 0:
                logger.images(done, ph["grid"][0], image_grid(ph["grid"][1]))
            if done % config.checkpoint.every == 0 or done == config.train.updates or stop["signal"]:
                save(done)
            if done == config.train.updates:
                whole = jax.tree_util.tree_map(to_host, model_params(state))  # every host takes part
                if jax.process_index() == 0:
                    pipe.save_pretrained(os.path.join(workdir, "model"), whole)
                    getattr(method, "write_model_extras", lambda folder, st: None)(os.path.join(workdir, "model"),
                                                                                    method.get_state())
                    echo(f"trained model: {os.path.join(workdir, 'model')} (python -m jaxedit.sample --checkpoint=...)")
            if stop["signal"]:
                echo(f"received signal {stop['signal']}: saved update {done}, exiting")
                break
            if stop_after is not None and done - start >= stop_after:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        scorer and scorer.close()
        bar.close()
        logger.close()
        ckpt.close()
    return {"metrics": metrics, "state": state, "pipeline": pipe, "policy": policy, "method": method}


def main(argv):
    del argv
    config = flags.FLAGS.config
    from jaxedit.runtime import enable_compilation_cache
    enable_compilation_cache()
    if not config.model.checkpoint:
        print("NOTE: no --config.model.checkpoint: training the embedded tiny checkpoint, whose weights are RANDOM "
              "(a demonstration of the method and the code path, not a useful model).")
    result = train(config)
    print(json.dumps({k: round(v, 5) for k, v in result["metrics"].items()}, indent=1))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/d3po_snow.py:tiny")
    flags.mark_flags_as_required(["config"])
    app.run(main)
