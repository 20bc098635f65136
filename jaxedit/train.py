"""D3PO preference fine-tuning of an editing model with AI feedback (Image-Editing Specialists).

    python -m jaxedit.train --config=configs/d3po_snow.py:tiny          # embedded tiny RANDOM model
    python -m jaxedit.train --config=configs/d3po_snow.py --config.model.checkpoint=/data/ip2p \
        --config.data.images=DIR --config.data.masks=DIR --config.data.styles=DIR

Each update: sample pairs of DDIM trajectories from the same x_T for a batch of (image, style),
decode and score them, prefer the pair member with the lower combined advantage, and take one
D3PO step (`jaxedit.rl.d3po`). The whole state (params, optimizer, step, data position, config)
is checkpointed every `checkpoint.every` updates and on SIGTERM; a killed run resumes from the
newest checkpoint in `workdir` (`--config.resume`, on by default).
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
import numpy as np
import optax
from absl import app, flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from jaxedit.checkpoint import Checkpointer
from jaxedit.data import images as imio
from jaxedit.data import loader as data_loader
from jaxedit.data import scenes
from jaxedit.diffusion import guidance
from jaxedit.diffusion.sampler import sample
from jaxedit.logging import RunLogger, image_grid
from jaxedit.models import lora, style_adapter
from jaxedit.models.tiny import make_tiny_checkpoint
from jaxedit.pipeline import EditPipeline
from jaxedit.rl import advantages, d3po
from jaxedit.scorers.base import InProcessQueue, make_scorer
from jaxedit.scorers.shm_queue import ScorerClient


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


def build_pipeline(config, workdir: str) -> EditPipeline:
    """The editing model: the configured checkpoint (or the tiny random one) + style adapter."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]
    path = config.model.checkpoint or make_tiny_checkpoint(os.path.join(workdir, "tiny-ip2p"))
    pipe = EditPipeline.from_pretrained(path, dtype=dtype)
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


def build_data(config, workdir: str, pairs_per_call: int, *, heldout: bool = False):
    """The training loader (shuffled, endless) or, with ``heldout``, one ordered pass over the
    held-out examples (``eval.*``; generated ones use another seed than the training scenes)."""
    src, seed, folder = (config.eval, config.seed + 10_000, "heldout") if heldout else (config.data, config.seed, "data")
    if src.generate:
        folders = scenes.write_dataset(os.path.join(workdir, folder), src.generate, config.data.generate_styles,
                                       style=config.edit.style, seed=seed, size=config.data.resolution)
        images, masks, styles = folders["images"], folders["masks"], folders["styles"]
    else:
        images, masks, styles = src.images, src.masks, config.data.styles
        if not images or not styles:
            what = "eval" if heldout else "data"
            raise ValueError(f"set --config.{what}.images and --config.data.styles (or --config.{what}.generate=N)")
    if not config.edit.segment:
        masks = None  # whole-frame edit
    return data_loader.make_loader(images, styles, masks or None, resolution=config.data.resolution,
                                   batch_size=pairs_per_call, seed=seed, shuffle=not heldout,
                                   num_epochs=1 if heldout else None, worker_count=config.data.worker_count,
                                   host_index=jax.process_index(), host_count=jax.process_count(),
                                   max_bad_files=config.data.max_bad_files)


def build_scorer(config):
    """The configured scorer behind ``submit``/``result``: in this process, or in the scorer
    process over shared memory (``score.process``; ``score.address`` = a server already running)."""
    kwargs = {"lam": config.score.lam}
    if config.score.scorer == "specialist":
        kwargs.update(structural=config.score.structural, depth_weights=config.score.depth_weights,
                      semantic=config.score.semantic, embed_weights=config.score.embed_weights)
    if not config.score.process:
        return InProcessQueue(make_scorer(config.score.scorer, **kwargs))
    command = None if config.score.address else [
        sys.executable, "-m", "jaxedit.scorers.server", f"--scorer={config.score.scorer}",
        f"--kwargs={json.dumps(kwargs)}", f"--threads={config.score.threads}"]
    return ScorerClient(command, address=config.score.address or None, slots=config.score.slots,
                        slot_bytes=config.score.slot_mb << 20, timeout=config.score.timeout_s,
                        restart=config.score.restart)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW after global-norm clipping of the update's accumulated gradient (as reference D3PO)."""
    return optax.chain(optax.clip_by_global_norm(config.train.max_grad_norm),
                       optax.adamw(config.train.lr, config.train.adam_b1, config.train.adam_b2,
                                   weight_decay=config.train.weight_decay))


def _cond(pipe: EditPipeline, config, image_latents, style_latents, text_emb, uncond):
    """Per-pair conditioning of the denoiser (P rows; the "" embedding and scales shared)."""
    s = config.sample
    if pipe.style:
        return guidance.SpecialistCond(image_latents, style_latents, text_emb, uncond, 1.0,
                                       s.guidance_text, s.guidance_image, s.guidance_style)
    return guidance.IP2PCond(image_latents, text_emb, uncond, s.guidance_text, s.guidance_image)


def _cond_axes(pipe: EditPipeline):
    """`_cond`'s vmap-style axes: 0 = per-pair leaf, None = shared."""
    if pipe.style:
        return guidance.SpecialistCond(0, 0, 0, None, None, None, None, None)
    return guidance.IP2PCond(0, 0, None, None, None)


def _map_pairs(fn, axes, *conds):
    """fn over the per-pair leaves of conds (the shared leaves are taken from the first)."""
    return jax.tree_util.tree_map(lambda ax, *cs: cs[0] if ax is None else fn(*cs), axes, *conds,
                                  is_leaf=lambda x: x is None)


def make_mesh(config) -> Mesh:
    """1-D mesh ("data",) over the first ``mesh.data`` devices (-1: all, across hosts); params
    are replicated over it, samples split along it."""
    devices = jax.devices()
    n = len(devices) if config.mesh.data == -1 else config.mesh.data
    if not 1 <= n <= len(devices) or (jax.process_count() > 1 and n != len(devices)):
        raise ValueError(f"mesh.data={config.mesh.data}: expected -1 (all) or 1..{len(devices)} devices"
                         + (" (multi-host runs use all devices)" if jax.process_count() > 1 else ""))
    return Mesh(np.asarray(devices[:n]), ("data",))


def make_sampler(pipe: EditPipeline, config):
    """Jitted sampling phase of one call: P (image, style) examples -> 2P samples in pair layout.

    ``run(params, vae_params, image, style, text_emb, uncond, key)`` with image/style uint8
    (P,H,W,3) -> (cond (P rows), Trajectory (S, 2P, h, w, 4), samples float (2P,H,W,3) in [-1,1]).
    Each pair's members start from the same x_T; the shardings of the inputs decide where it runs.
    """
    def run(params, vae_params, image, style, text_emb, uncond, key):
        p = image.shape[0]
        image_latents = pipe.encode_images(imio.to_model(image), vae_params)
        style_latents = pipe.encode_images(imio.to_model(style), vae_params) if pipe.style else None
        cond = _cond(pipe, config, image_latents, style_latents,
                     jnp.broadcast_to(text_emb, (p,) + text_emb.shape[1:]), uncond[0])
        z = jax.random.normal(jax.random.fold_in(key, 0), image_latents.shape)
        both = _map_pairs(lambda c: jnp.concatenate([c, c]), _cond_axes(pipe), cond)  # per sample
        x0, traj = sample(pipe.denoise, params, both, pipe.schedule, jnp.concatenate([z, z]),
                          jax.random.fold_in(key, 1), steps=config.sample.steps, sampler="ddim",
                          eta=config.sample.eta, return_trajectory=True)
        return cond, traj, pipe.decode(x0, vae_params)
    return jax.jit(run)


def _to_host(x) -> np.ndarray:
    """A global array -> the whole array as NumPy on every host."""
    return np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)


def preferences(config, scores: dict) -> tuple[np.ndarray, np.ndarray]:
    """Scores of 2P samples (pair layout) -> (winner_is_first (P,), valid (P,))."""
    struct, sem = scores["structural"], scores["semantic"]
    if config.score.ranking == "pareto":
        return advantages.pareto_preference(struct, sem)
    if config.score.ranking != "sum":
        raise ValueError(f"score.ranking={config.score.ranking!r}: expected 'sum' or 'pareto'")
    return advantages.pair_preference(advantages.combined(struct, sem, config.score.alpha))


def _pair_layout(chunks, axis: int = 0, xp=np):
    """Chunks with 2P_i samples (pair layout) along `axis` -> one with 2ΣP_i samples in pair layout."""
    halves = [xp.split(c, 2, axis=axis) for c in chunks]
    return xp.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=axis)


def batch_sizes(config, devices: int) -> tuple[int, int]:
    """(pairs per update, pairs per sampling call), checked against micro-batches and devices."""
    pairs_total, pairs_call = config.train.samples_per_update // 2, config.sample.batch_size // 2
    checks = (("train.samples_per_update/2", pairs_total, pairs_call),
              ("sample.batch_size/2", pairs_call, devices),  # every device samples whole pairs
              ("train.samples_per_update/2", pairs_total, config.train.micro_batch))
    for name, value, unit in checks:
        if value < 1 or value % unit:
            raise ValueError(f"{name} = {value} pairs is not a positive multiple of {unit} (sample.batch_size "
                             f"{config.sample.batch_size}, train.micro_batch {config.train.micro_batch}, "
                             f"{devices} devices)")
    return pairs_total, pairs_call


def sampling_phase(sampler, pipe, params, loader, calls: int, mesh: Mesh, text_emb, uncond, key, scorer) -> dict:
    """``calls`` sampling calls, each scored while the next one samples -> the update's inputs,
    2P samples in pair layout.

    Returns cond (P rows), x_t / x_prev (S, 2P, ...), t (S,), samples uint8 (2P,H,W,3), scores
    {name: (2P,)}, and the global examples (image, style, mask, index; P rows) as NumPy on every host.
    """
    split = NamedSharding(mesh, PartitionSpec("data"))
    out = {k: [] for k in ("cond", "traj", "samples", "examples", "requests")}
    for c in range(calls):
        local = next(loader)
        image, style = (jax.make_array_from_process_local_data(split, local[k]) for k in ("image", "style"))
        cond, traj, x = sampler(params, pipe.vae_params, image, style, text_emb, uncond, jax.random.fold_in(key, c))
        samples = imio.from_model(_to_host(x))
        ex = local if jax.process_count() == 1 else multihost_utils.process_allgather(local, tiled=True)
        two = lambda k: np.concatenate([ex[k], ex[k]])  # pair layout
        out["requests"].append(scorer.submit(inputs=two("image"), generated=samples, styles=two("style"),
                                             masks=two("mask")))
        out["cond"].append(cond), out["traj"].append(traj), out["samples"].append(samples), out["examples"].append(ex)
    scores = [scorer.result(r) for r in out["requests"]]
    return {"scores": {k: _pair_layout([s[k] for s in scores]) for k in scores[0]},"cond": _map_pairs(lambda *cs: jnp.concatenate(cs), _cond_axes(pipe), *out["cond"]),
            "x_t": _pair_layout([t.x_t for t in out["traj"]], axis=1, xp=jnp),
            "x_prev": _pair_layout([t.x_prev for t in out["traj"]], axis=1, xp=jnp),
            "t": out["traj"][0].t,
            "samples": _pair_layout(out["samples"]),
            "examples": {k: np.concatenate([e[k] for e in out["examples"]]) for k in out["examples"][0]},
            "first_call": (out["examples"][0], out["samples"][0])}


def heldout_metrics(config, scores: dict) -> dict:
    """Means of the held-out scores, and their total structural + α·semantic (lower is better)."""
    out = {f"heldout/{k}_mean": float(np.mean(v)) for k, v in scores.items()}
    if {"structural", "semantic"} <= set(scores):
        out["heldout/total_mean"] = float(np.mean(scores["structural"] + config.score.alpha * scores["semantic"]))
    return out


def train(config, *, log=print, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the configured training; returns the last update's metrics.

    `stop_after` ends the run after that many updates in this process (tests of resumption).
    """
    if config.distributed:
        jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: coordinates are auto-detected
    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config)
    pairs_total, pairs_call = batch_sizes(config, mesh.size)
    replicate = lambda tree: jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))

    pipe = build_pipeline(config, workdir)
    policy = build_policy(config, pipe)
    pipe = dataclasses.replace(pipe, vae_params=replicate(pipe.vae_params))
    policy = dataclasses.replace(policy, ref_params=replicate(policy.ref_params))
    loader = build_data(config, workdir, pairs_call // jax.process_count())
    optimizer = make_optimizer(config)
    update = d3po.make_update(pipe.denoise, optimizer, pipe.schedule, beta=config.train.beta,
                              clip_eps=config.train.clip_eps, eta=config.sample.eta,
                              steps_per_update=max(1, int(config.sample.steps * config.train.timestep_fraction)),
                              merge=policy.merge, cond_axes=_cond_axes(pipe),
                              micro_batches=pairs_total // config.train.micro_batch)
    sampler = make_sampler(pipe, config)
    heldout = list(build_data(config, workdir, pairs_call // jax.process_count(), heldout=True)) \
        if config.eval.every else []
    if config.eval.every and not heldout:
        raise ValueError(f"eval: fewer held-out examples than the {pairs_call} pairs of one sampling call")
    state = replicate(d3po.init_train_state(policy.trainable, optimizer))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    start = 0
    if config.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        loader.set_state(meta["data"])
        start = meta["update"]
        log(f"resumed from update {start} ({ckpt.directory})")
    bar = tqdm(total=config.train.updates, initial=start, unit="update", desc="D3PO",
               disable=None if config.log.progress else True)  # None: only on a terminal
    echo = bar.write if not bar.disable and log is print else log
    logger = RunLogger(workdir, tensorboard=config.log.tensorboard, enabled=jax.process_index() == 0, echo=echo)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    text_emb, uncond = replicate(pipe.encode_text([config.edit.instruction])), replicate(pipe.encode_text([""]))
    base_key = jax.random.key(config.seed)
    nonfinite, metrics = 0, {}

    def save(step):
        ckpt.save(step, state, {"update": step, "data": loader.get_state(), "config": json.loads(config.to_json())})

    def evaluate(state) -> dict:  # the same held-out examples and noise every time
        ph = sampling_phase(sampler, pipe, policy.params(state.params), iter(heldout), len(heldout), mesh,
                            text_emb, uncond, jax.random.key(config.seed + 10_000), scorer)
        return heldout_metrics(config, ph["scores"])

    scorer = build_scorer(config)  # (a process, maybe) stopped in the `finally`

    try:
        if heldout and start == 0:
            logger.scalars(0, evaluate(state), echo=bar.disable)
        for u in range(start, config.train.updates):
            key = jax.random.fold_in(base_key, u)
            t0 = time.perf_counter()
            ph = sampling_phase(sampler, pipe, policy.params(state.params), loader, pairs_total // pairs_call,
                                mesh, text_emb, uncond, key, scorer)
            t_sample = time.perf_counter() - t0
            scores = ph["scores"]
            win, valid = preferences(config, scores)
            t1 = time.perf_counter()
            batch = d3po.D3POBatch(ph["x_t"], ph["x_prev"], ph["t"], ph["cond"], jnp.asarray(win), jnp.asarray(valid))
            state, m = update(state, policy.ref_params, batch, jax.random.fold_in(key, 1_000_000))
            # Fetching the metrics awaits the step (XLA:CPU collectives can deadlock otherwise).
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            t_update = time.perf_counter() - t1
            nonfinite = nonfinite + 1 if m["skipped"] > 0 else 0
            if nonfinite >= config.train.max_nonfinite:
                raise TrainingError(f"{nonfinite} updates in a row had a non-finite loss or gradient; "
                                    f"stopping (last good state is in {ckpt.directory})")
            if nonfinite:
                echo(f"warning: update {u + 1} skipped: non-finite loss or gradient ({nonfinite} in a row)")
            metrics = {**{f"d3po/{k}": v for k, v in m.items()},
                       **{f"score/{k}_mean": float(np.mean(v)) for k, v in scores.items()},
                       **{f"score/{k}_std": float(np.std(v)) for k, v in scores.items()},
                       "pairs/valid_fraction": float(np.mean(valid)),
                       "time/sample_s": t_sample, "time/update_s": t_update,
                       "time/samples_per_s": 2 * pairs_total / t_sample}
            done = u + 1
            if heldout and (done % config.eval.every == 0 or done == config.train.updates):
                metrics.update(evaluate(state))
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{m['approx_kl']:.2g}",
                            **{k: f"{np.mean(v):.4f}" for k, v in scores.items()})
            if done % config.log.every == 0:
                logger.scalars(done, metrics, echo=bar.disable)
            if config.log.images_every and done % config.log.images_every == 0:
                examples, samples = ph["first_call"]
                rows = [[examples["image"][i], examples["style"][i], samples[i], samples[i + pairs_call]]
                        for i in range(min(4, pairs_call))]
                logger.images(done, "input_style_sampleA_sampleB", image_grid(rows))
            if done % config.checkpoint.every == 0 or done == config.train.updates or stop["signal"]:
                save(done)
            if done == config.train.updates and jax.process_index() == 0:
                pipe.save_pretrained(os.path.join(workdir, "model"), policy.params(state.params))
                echo(f"trained model: {os.path.join(workdir, 'model')} (python -m jaxedit.sample --checkpoint=...)")
            if stop["signal"]:
                echo(f"received signal {stop['signal']}: saved update {done}, exiting")
                break
            if stop_after is not None and done - start >= stop_after:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        scorer.close()
        bar.close()
        logger.close()
        ckpt.close()
    return {"metrics": metrics, "state": state, "pipeline": pipe, "policy": policy}


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
