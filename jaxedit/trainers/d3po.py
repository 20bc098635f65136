"""D3PO with AI feedback (Image-Editing Specialists): the sampling phase and the update.

Each update: ``train.samples_per_update / 2`` pairs of DDIM trajectories, each pair from the same
x_T for one (image, style) example, sampled ``sample.batch_size`` images per call; every call is
scored (scorer process or in-process) while the next one samples; the pair member with the lower
combined advantage is preferred; one D3PO step (`jaxedit.rl.d3po`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import parallel
from jaxedit.data import images as imio
from jaxedit.diffusion import guidance
from jaxedit.diffusion.sampler import sample
from jaxedit.rl import advantages, d3po
from jaxedit.trainers.common import check_multiple, gather_examples, host_slice, shard_batch, to_host


def _cond(pipe, config, image_latents, style_latents, text_emb, uncond):
    """Per-pair conditioning of the denoiser (P rows; the "" embedding and scales shared)."""
    s = config.sample
    if pipe.style:
        return guidance.SpecialistCond(image_latents, style_latents, text_emb, uncond, 1.0,
                                       s.guidance_text, s.guidance_image, s.guidance_style)
    return guidance.IP2PCond(image_latents, text_emb, uncond, s.guidance_text, s.guidance_image)


def cond_axes(pipe):
    """`_cond`'s vmap-style axes: 0 = per-pair leaf, None = shared."""
    if pipe.style:
        return guidance.SpecialistCond(0, 0, 0, None, None, None, None, None)
    return guidance.IP2PCond(0, 0, None, None, None)


def map_pairs(fn, axes, *conds):
    """fn over the per-pair leaves of conds (the shared leaves are taken from the first)."""
    return jax.tree_util.tree_map(lambda ax, *cs: cs[0] if ax is None else fn(*cs), axes, *conds,
                                  is_leaf=lambda x: x is None)


def make_sampler(pipe, config, layout: parallel.Layout = parallel.Layout()):
    """Jitted sampling phase of one call: P (image, style) examples -> 2P samples in pair layout.

    ``run(params, vae_params, image, style, text_emb, uncond, key)`` with image/style uint8
    (P,H,W,3) -> (cond (P rows), Trajectory (S, 2P, h, w, 4), samples float (2P,H,W,3) in [-1,1]).
    Each pair's members start from the same x_T; the shardings of the inputs decide where it runs.
    """
    def run(params, vae_params, image, style, text_emb, uncond, key):
        params = layout.gather(params)  # whole weights, samples split over the devices
        p = image.shape[0]
        image_latents = pipe.encode_images(imio.to_model(image), vae_params)
        style_latents = pipe.encode_images(imio.to_model(style), vae_params) if pipe.style else None
        cond = _cond(pipe, config, image_latents, style_latents,
                     jnp.broadcast_to(text_emb, (p,) + text_emb.shape[1:]), uncond[0])
        z = jax.random.normal(jax.random.fold_in(key, 0), image_latents.shape)
        both = map_pairs(lambda c: jnp.concatenate([c, c]), cond_axes(pipe), cond)  # per sample
        x0, traj = sample(pipe.denoise, params, both, pipe.schedule, jnp.concatenate([z, z]),
                          jax.random.fold_in(key, 1), steps=config.sample.steps, sampler="ddim",
                          eta=config.sample.eta, return_trajectory=True)
        return cond, traj, pipe.decode(x0, vae_params)
    return jax.jit(run)


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
    context = (f"sample.batch_size {config.sample.batch_size}, train.samples_per_update "
               f"{config.train.samples_per_update}, train.micro_batch {config.train.micro_batch}, {devices} devices")
    check_multiple("train.samples_per_update/2 (pairs)", pairs_total, pairs_call, context)
    check_multiple("sample.batch_size/2 (pairs)", pairs_call, devices, context)  # every device samples whole pairs
    check_multiple("train.samples_per_update/2 (pairs)", pairs_total, config.train.micro_batch, context)
    return pairs_total, pairs_call


def sampling_phase(sampler, pipe, params, loader, calls: int, mesh, text_emb, uncond, key, scorer) -> dict:
    """``calls`` sampling calls, each scored while the next one samples -> the update's inputs,
    2P samples in pair layout. Every host gathers all samples and scores its own contiguous share
    of them in its own scorer (process); the scores are then gathered on every host.

    Returns cond (P rows), x_t / x_prev (S, 2P, ...), t (S,), samples uint8 (2P,H,W,3), scores
    {name: (2P,)}, and the global examples (image, style, mask, index; P rows) as NumPy on every host.
    """
    out = {k: [] for k in ("cond", "traj", "samples", "examples", "requests")}
    for c in range(calls):
        local = next(loader)
        image, style = shard_batch(mesh, local["image"], local["style"])
        cond, traj, x = sampler(params, pipe.vae_params, image, style, text_emb, uncond, jax.random.fold_in(key, c))
        samples = imio.from_model(to_host(x))
        ex = gather_examples(local)
        mine = host_slice(len(samples))  # each host's scorer scores its share of the samples
        two = lambda k: np.concatenate([ex[k], ex[k]])[mine]  # pair layout
        out["requests"].append(scorer.submit(inputs=two("image"), generated=samples[mine], styles=two("style"),
                                             masks=two("mask")))
        out["cond"].append(cond), out["traj"].append(traj), out["samples"].append(samples), out["examples"].append(ex)
    scores = [gather_examples(scorer.result(r)) for r in out["requests"]]
    return {"scores": {k: _pair_layout([s[k] for s in scores]) for k in scores[0]},
            "cond": map_pairs(lambda *cs: jnp.concatenate(cs), cond_axes(pipe), *out["cond"]),
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


def make_step(config, pipe, policy, optimizer, pairs: int, mesh=None):
    """The jitted D3PO update of ``pairs`` pairs as configured (`jaxedit.rl.d3po.make_update`);
    with ``mesh``, its state and gradients are pinned to the FSDP shardings (`jaxedit.parallel`)."""
    t = config.train
    return d3po.make_update(pipe.denoise, optimizer, pipe.schedule, beta=t.beta, clip_eps=t.clip_eps,
                            eta=config.sample.eta, steps_per_update=max(1, int(config.sample.steps * t.timestep_fraction)),
                            merge=policy.merge, cond_axes=cond_axes(pipe), micro_batches=pairs // t.micro_batch,
                            layout=parallel.layout(config, mesh))


class D3PO:
    """The D3PO method for `jaxedit.train` (see the module docstring)."""
    name = "d3po"

    def __init__(self, config, pipe, policy, mesh, optimizer, scorer):
        if scorer is None:
            raise ValueError("method d3po needs a scorer (config.score)")
        self.config, self.pipe, self.mesh, self.scorer = config, pipe, mesh, scorer
        self.pairs_total, self.pairs_call = batch_sizes(config, mesh.size)
        self.examples_per_call = self.pairs_call  # global examples per sampling call
        self.sampler = make_sampler(pipe, config, parallel.layout(config, mesh))
        self.step = make_step(config, pipe, policy, optimizer, self.pairs_total, mesh)
        self.text_emb = parallel.replicate(pipe.encode_text([config.edit.instruction]), mesh)
        self.uncond = parallel.replicate(pipe.encode_text([""]), mesh)

    def collect(self, params, loader, key, calls: int | None = None) -> dict:
        calls = self.pairs_total // self.pairs_call if calls is None else calls
        ph = sampling_phase(self.sampler, self.pipe, params, loader, calls, self.mesh, self.text_emb, self.uncond,
                            key, self.scorer)
        ph["win"], ph["valid"] = preferences(self.config, ph["scores"])
        scores = ph["scores"]
        ph["metrics"] = {**{f"score/{k}_mean": float(np.mean(v)) for k, v in scores.items()},
                         **{f"score/{k}_std": float(np.std(v)) for k, v in scores.items()},
                         "pairs/valid_fraction": float(np.mean(ph["valid"]))}
        ph["postfix"] = {k: f"{np.mean(v):.4f}" for k, v in scores.items()}
        examples, samples = ph["first_call"]
        ph["grid"] = ("input_style_sampleA_sampleB",
                      [[examples["image"][i], examples["style"][i], samples[i], samples[i + len(samples) // 2]]
                       for i in range(min(4, len(samples) // 2))])
        return ph

    def update(self, state, ref_params, ph: dict, key):
        """One D3PO step -> (state, metrics {name: float}, skipped: bool)."""
        batch = d3po.D3POBatch(ph["x_t"], ph["x_prev"], ph["t"], ph["cond"], jnp.asarray(ph["win"]),
                               jnp.asarray(ph["valid"]))
        state, m = self.step(state, ref_params, batch, key)
        # Fetching the metrics awaits the step (XLA:CPU collectives can deadlock otherwise).
        m = {f"d3po/{k}": float(v) for k, v in jax.device_get(m).items()}
        return state, m, m["d3po/skipped"] > 0

    def evaluate(self, params, heldout: list, index, key) -> dict:
        ph = sampling_phase(self.sampler, self.pipe, params, iter(heldout), len(heldout), self.mesh,
                            self.text_emb, self.uncond, key, self.scorer)
        return heldout_metrics(self.config, ph["scores"])

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['d3po/loss']:.4f}", "kl": f"{metrics['d3po/approx_kl']:.2g}"}

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass
