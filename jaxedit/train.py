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
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

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
from jaxedit.scorers import make_scorer


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


def build_data(config, workdir: str, pairs_per_call: int):
    if config.data.generate:
        folders = scenes.write_dataset(os.path.join(workdir, "data"), config.data.generate,
                                       config.data.generate_styles, style=config.edit.style, seed=config.seed,
                                       size=config.data.resolution)
        images, masks, styles = folders["images"], folders["masks"], folders["styles"]
    else:
        images, masks, styles = config.data.images, config.data.masks, config.data.styles
        if not images or not styles:
            raise ValueError("set --config.data.images and --config.data.styles (or --config.data.generate=N)")
    if not config.edit.segment:
        masks = None  # whole-frame edit
    return data_loader.make_loader(images, styles, masks or None, resolution=config.data.resolution,
                                   batch_size=pairs_per_call, seed=config.seed, worker_count=config.data.worker_count,
                                   host_index=jax.process_index(), host_count=jax.process_count(),
                                   max_bad_files=config.data.max_bad_files)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW after global-norm clipping of the update's accumulated gradient (as reference D3PO)."""
    return optax.chain(optax.clip_by_global_norm(config.train.max_grad_norm),
                       optax.adamw(config.train.lr, config.train.adam_b1, config.train.adam_b2,
                                   weight_decay=config.train.weight_decay))


def _cond(pipe: EditPipeline, config, image_latents, style_latents, text_emb, uncond):
    """Per-pair conditioning (P rows) and its vmap axes."""
    s = config.sample
    if pipe.style:
        cond = guidance.SpecialistCond(image_latents, style_latents, text_emb, uncond, 1.0,
                                       s.guidance_text, s.guidance_image, s.guidance_style)
        return cond, guidance.SpecialistCond(0, 0, 0, None, None, None, None, None)
    cond = guidance.IP2PCond(image_latents, text_emb, uncond, s.guidance_text, s.guidance_image)
    return cond, guidance.IP2PCond(0, 0, None, None, None)


def _tile2(cond, axes):
    """Per-pair cond (P, ...) -> per-sample cond (2P, ...) in pair layout."""
    return jax.tree_util.tree_map(lambda ax, c: c if ax is None else jnp.concatenate([c, c]), axes, cond,
                                  is_leaf=lambda x: x is None)


def sample_pairs(pipe, config, params, batch, text_emb, uncond, key):
    """One call: P (image, style) examples -> trajectories and decoded samples of 2P in pair layout."""
    p = batch["image"].shape[0]
    image_latents = pipe.encode_images(imio.to_model(batch["image"]))
    style_latents = pipe.encode_images(imio.to_model(batch["style"])) if pipe.style else None
    cond, axes = _cond(pipe, config, image_latents, style_latents, jnp.broadcast_to(text_emb, (p,) + text_emb.shape[1:]),
                       uncond[0])
    z = jax.random.normal(jax.random.fold_in(key, 0), image_latents.shape)
    x0, traj = sample(pipe.denoise, params, _tile2(cond, axes), pipe.schedule, jnp.concatenate([z, z]),
                      jax.random.fold_in(key, 1), steps=config.sample.steps, sampler="ddim", eta=config.sample.eta,
                      return_trajectory=True)
    images = imio.from_model(pipe.decode(x0))
    return cond, axes, traj, images


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


def _stack_pairs(trajectories):
    """Trajectory arrays (S, 2P_i, ...) -> (S, 2ΣP_i, ...) in pair layout."""
    return _pair_layout(trajectories, axis=1, xp=jnp)


def train(config, *, log=print, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the configured training; returns the last update's metrics.

    `stop_after` ends the run after that many updates in this process (tests of resumption).
    """
    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    pairs_total = config.train.samples_per_update // 2
    pairs_call = config.sample.batch_size // 2
    micro = config.train.micro_batch
    for name, value, unit in (("train.samples_per_update", pairs_total, pairs_call), ("sample.batch_size//2", pairs_call, 1)):
        if value < 1 or value % unit:
            raise ValueError(f"{name}: {value} pairs is not a positive multiple of {unit}")
    if pairs_total % micro:
        raise ValueError(f"train.micro_batch={micro} must divide the {pairs_total} pairs per update")

    pipe = build_pipeline(config, workdir)
    policy = build_policy(config, pipe)
    loader = build_data(config, workdir, pairs_call // jax.process_count())
    scorer = make_scorer(config.score.scorer, lam=config.score.lam)
    optimizer = make_optimizer(config)
    update = d3po.make_update(pipe.denoise, optimizer, pipe.schedule, beta=config.train.beta,
                              clip_eps=config.train.clip_eps, eta=config.sample.eta,
                              steps_per_update=max(1, int(config.sample.steps * config.train.timestep_fraction)),
                              merge=policy.merge,
                              cond_axes=_cond(pipe, config, None, None, None, None)[1],
                              micro_batches=pairs_total // micro)
    state = d3po.init_train_state(policy.trainable, optimizer)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    start = 0
    if config.resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        loader.set_state(meta["data"])
        start = meta["update"]
        log(f"resumed from update {start} ({ckpt.directory})")
    logger = RunLogger(workdir, tensorboard=config.log.tensorboard, enabled=jax.process_index() == 0, echo=log)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    text_emb, uncond = pipe.encode_text([config.edit.instruction]), pipe.encode_text([""])
    base_key = jax.random.key(config.seed)
    nonfinite, metrics = 0, {}

    def save(step):
        ckpt.save(step, state, {"update": step, "data": loader.get_state(), "config": json.loads(config.to_json())})

    try:
        for u in range(start, config.train.updates):
            key = jax.random.fold_in(base_key, u)
            t0 = time.perf_counter()
            params = policy.params(state.params)
            conds, trajs, samples, batches = [], [], [], []
            for c in range(pairs_total // pairs_call):  # sampling phase
                batch = next(loader)
                cond, axes, traj, imgs = sample_pairs(pipe, config, params, batch, text_emb, uncond,
                                                      jax.random.fold_in(key, c))
                conds.append(cond), trajs.append(traj), samples.append(imgs), batches.append(batch)
            t_sample = time.perf_counter() - t0
            gen = _pair_layout(samples)
            two = lambda k: np.concatenate([np.concatenate([b[k] for b in batches])] * 2)
            scores = scorer(two("image"), gen, two("style"), two("mask"))
            win, valid = preferences(config, scores)
            t1 = time.perf_counter()
            cond_all = jax.tree_util.tree_map(lambda ax, *cs: cs[0] if ax is None else jnp.concatenate(cs), axes, *conds,
                                              is_leaf=lambda x: x is None)
            x_t, x_prev = _stack_pairs([t.x_t for t in trajs]), _stack_pairs([t.x_prev for t in trajs])
            batch = d3po.D3POBatch(x_t, x_prev, trajs[0].t, cond_all, jnp.asarray(win), jnp.asarray(valid))
            state, m = update(state, policy.ref_params, batch, jax.random.fold_in(key, 1_000_000))
            m = {k: float(v) for k, v in jax.device_get(jax.block_until_ready(m)).items()}
            nonfinite = nonfinite + 1 if m["skipped"] > 0 else 0
            if nonfinite >= config.train.max_nonfinite:
                raise TrainingError(f"{nonfinite} updates in a row had a non-finite loss or gradient; "
                                    f"stopping (last good state is in {ckpt.directory})")
            if nonfinite:
                log(f"warning: update {u + 1} skipped: non-finite loss or gradient ({nonfinite} in a row)")
            t_update = time.perf_counter() - t1
            metrics = {**{f"d3po/{k}": v for k, v in m.items()},
                       **{f"score/{k}_mean": float(np.mean(v)) for k, v in scores.items()},
                       **{f"score/{k}_std": float(np.std(v)) for k, v in scores.items()},
                       "pairs/valid_fraction": float(np.mean(valid)),
                       "time/sample_s": t_sample, "time/update_s": t_update,
                       "time/samples_per_s": 2 * pairs_total / t_sample}
            if (u + 1) % config.log.every == 0:
                logger.scalars(u + 1, metrics)
            if config.log.images_every and (u + 1) % config.log.images_every == 0:
                b0 = batches[0]
                rows_img = [[b0["image"][i], b0["style"][i], samples[0][i], samples[0][i + pairs_call]]
                            for i in range(min(4, pairs_call))]
                logger.images(u + 1, "input_style_sampleA_sampleB", image_grid(rows_img))
            done = u + 1
            if done % config.checkpoint.every == 0 or done == config.train.updates or stop["signal"]:
                save(done)
            if done == config.train.updates and jax.process_index() == 0:
                pipe.save_pretrained(os.path.join(workdir, "model"), policy.params(state.params))
                log(f"trained model: {os.path.join(workdir, 'model')} (python -m jaxedit.sample --checkpoint=...)")
            if stop["signal"]:
                log(f"received signal {stop['signal']}: saved update {done}, exiting")
                break
            if stop_after is not None and done - start >= stop_after:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
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
