"""Supervised instruction training (InstructPix2Pix; HIVE step 1) and HIVE's reward fine-tuning
(step 3), one method selected by ``config.hive.mode``:

- ``sft``: the denoising loss on (input, instruction, edited) triples (`jaxedit.rl.hive`), with
  conditioning dropout (5 % text, 5 % image, 5 % both) and optional cycle-consistency
  augmentation (``hive.cycle``, `jaxedit.data.cycle`);
- ``weighted``: each triple's precomputed reward R (the triples' ``"reward"``) weights its loss,
  w = exp(R/η) normalised to mean 1 over the update's batch (``hive.eta``);
- ``condition``: R is quantised into five levels by the quantiles of the training set's rewards
  (computed once, kept in the method state, so checkpointed, and written to
  ``model/hive_quantiles.json``), and ", image quality is K out of five" is appended to the
  instruction; held-out sampling uses "five out of five".

Each update: ``train.samples_per_update`` examples, loaded ``hive.encode_batch`` at a time
(0 = all at once), augmented on device (`hive.random_crop_flip`: random resize to
s ∈ [hive.resize_min, hive.resize_max] px of the loaded hive.resize_max square, random
data.resolution crop, horizontal flip with p = hive.flip_prob, the same for input, edited image
and mask; InstructPix2Pix trains with resize 256-288, crop 256, flip 0.5), VAE-encoded (edited:
posterior sample x 0.18215 when ``hive.vae_sample``, else its mode; input: mode, unscaled), then
ONE optimizer step of the loss over ``train.micro_batch``-sized chunks. The EMA of the weights
(``hive.ema_decay``, LitEma warm-up with ``hive.ema_warmup``) lives in the optimizer state
(`jaxedit.rl.hive.ema_weights`, added by `jaxedit.train.make_optimizer`), so it is checkpointed
with it; the held-out evaluation and the saved model use it (``model_trainable``).

Held-out evaluation: the held-out triples (no augmentation) are edited with fixed noise (DDIM,
``sample.steps``, ``sample.eta``, guidance ``sample.guidance_text/image``) and compared with the
target edit: ``heldout/latent_mse`` (sampled latent vs 0.18215·E(target), mode),
``heldout/edit_progress`` (projection of the sample's change from the input latent onto the
target's change: 0 = unchanged input, 1 = the target), ``heldout/pixel_mse`` (decoded sample vs
the target image, [-1, 1] scale) and ``heldout/input_latent_mse`` (the unedited input's
distance, a constant reference).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import parallel
from jaxedit.data import images as imio
from jaxedit.data import loader as data_loader
from jaxedit.data import scenes
from jaxedit.data.cycle import CycleRules
from jaxedit.data.instructions import build_instruction_index
from jaxedit.diffusion import guidance
from jaxedit.diffusion.sampler import sample
from jaxedit.rl import hive
from jaxedit.trainers.common import check_multiple, gather_examples, shard_batch, to_host

MODES = ("sft", "weighted", "condition")
QUANTILES_FILE = "hive_quantiles.json"


def _sizes(config) -> tuple[int, int, int]:
    """(crop size = data.resolution, resize_min, resize_max) with 0 meaning data.resolution."""
    r, h = config.data.resolution, config.hive
    lo, hi = h.resize_min or r, h.resize_max or r
    if not r <= lo <= hi:
        raise ValueError(f"hive.resize_min={h.resize_min}, hive.resize_max={h.resize_max}: need data.resolution "
                         f"{r} <= resize_min <= resize_max (0 = data.resolution)")
    return r, lo, hi


def build_data(config, src, folder: str, *, heldout: bool, resolution: int, seed: int, **common):
    """The sft loader: triples with their edited images ("edited"), rewards in the index in the
    reward modes, cycle-augmented with ``hive.cycle``; training images are loaded at
    ``hive.resize_max`` (the crop augmentation's source), held-out ones at data.resolution.
    ``src``: config.data or config.eval; ``folder``: where generated triples go."""
    h = config.hive
    what = "eval" if heldout else "data"
    size = resolution if heldout else _sizes(config)[2]
    rewards = h.mode != "sft" and not heldout
    source = src.instructions
    if src.generate:
        source = scenes.write_edit_triples(folder, src.generate, seed=seed, size=size, graded=rewards)
    elif not source:
        raise ValueError(f"set --config.{what}.instructions (triples .jsonl with outputs, a MagicBrush or an "
                         f"InstructPix2Pix folder) or --config.{what}.generate=N")
    cycle = CycleRules.from_file(h.cycle_mapping) if h.cycle and not heldout else None
    index = build_instruction_index(source, max_bad_files=config.data.max_bad_files, with_outputs=True,
                                    with_rewards=rewards, cycle=cycle)
    return data_loader.make_loader(index=index, resolution=size, seed=seed, **common)


def make_prepare(pipe, config):
    """Jitted ``prepare(vae_params, image, edited, mask, key)`` (uint8 (B,L,L,3) x2, (B,L,L)) ->
    (z0, image_latents, augmented input uint8, augmented edited uint8), see the module docstring."""
    size, lo, _ = _sizes(config)
    h, scale = config.hive, pipe.vae.config.scaling_factor

    def run(vae_params, image, edited, mask, key):
        k_aug, k_vae = jax.random.split(key)
        a = hive.random_crop_flip(k_aug, {"image": image, "edited": edited, "mask": mask}, size, lo, h.flip_prob)
        to_model = lambda x: x / 127.5 - 1.0
        image_latents = pipe.encode_images(to_model(a["image"]), vae_params)
        post = pipe.vae.apply({"params": vae_params}, to_model(a["edited"]), method=pipe.vae.encode)
        z0 = scale * (post.sample(k_vae) if h.vae_sample else post.mode())
        as_uint8 = lambda x: jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
        return z0, image_latents, as_uint8(a["image"]), as_uint8(a["edited"])
    return jax.jit(run)


def make_evaluator(pipe, config, layout: parallel.Layout = parallel.Layout()):
    """Jitted ``run(params, vae_params, image, edited, text_emb, uncond, key)`` -> (edits float
    (B,H,W,3) in [-1,1], {metric: (B,)}) (see the module docstring)."""
    s, scale = config.sample, pipe.vae.config.scaling_factor

    def run(params, vae_params, image, edited, text_emb, uncond, key):
        params = layout.gather(params)  # whole weights, samples split over the devices
        inputs, target_img = imio.to_model(image), imio.to_model(edited)
        latents = pipe.encode_images(inputs, vae_params)
        target = scale * pipe.encode_images(target_img, vae_params)
        cond = guidance.IP2PCond(latents, text_emb, uncond[0], s.guidance_text, s.guidance_image)
        z = jax.random.normal(jax.random.fold_in(key, 0), latents.shape)
        x0 = sample(pipe.denoise, params, cond, pipe.schedule, z, jax.random.fold_in(key, 1), steps=s.steps,
                    sampler="ddim", eta=s.eta)
        a = scale * latents
        ax = (1, 2, 3)
        d = target - a
        x = jnp.clip(pipe.decode(x0, vae_params), -1.0, 1.0)
        return x, {"latent_mse": jnp.mean((x0 - target) ** 2, ax), "input_latent_mse": jnp.mean(d ** 2, ax),
                   "edit_progress": jnp.sum((x0 - a) * d, ax) / jnp.maximum(jnp.sum(d ** 2, ax), 1e-12),
                   "pixel_mse": jnp.mean((x - target_img) ** 2, ax)}
    return jax.jit(run)


def make_step(config, pipe, policy, optimizer, examples: int, mesh=None):
    """The jitted supervised / HIVE update of ``examples`` examples (`jaxedit.rl.hive.make_update`);
    with ``mesh``, its state and gradients are pinned to the FSDP shardings (`jaxedit.parallel`)."""
    return hive.make_update(lambda p, x, ts, ctx: pipe.unet.apply({"params": p}, x, ts, ctx), optimizer,
                            pipe.schedule.alphas_cumprod, pipe.schedule.num_train_timesteps, merge=policy.merge,
                            micro_batches=examples // config.train.micro_batch, dropout=config.hive.dropout,
                            layout=parallel.layout(config, mesh))


class SFT:
    """Supervised / HIVE training for `jaxedit.train` (see the module docstring)."""
    name = "sft"

    def __init__(self, config, pipe, policy, mesh, optimizer, scorer=None):
        if pipe.style:
            raise ValueError("method sft trains InstructPix2Pix models: set --config.model.style_adapter=False")
        h, t = config.hive, config.train
        if h.mode not in MODES:
            raise ValueError(f"hive.mode={h.mode!r}: expected one of {', '.join(MODES)}")
        if h.mode == "weighted" and not h.eta > 0:
            raise ValueError(f"hive.eta={h.eta}: the weighted reward loss needs a temperature > 0")
        if h.cycle and h.mode != "sft":
            raise ValueError("hive.cycle: reversed triples have no reward; for the reward modes augment the triples "
                             "first (python -m jaxedit.data.cycle IN OUT) and score them with the reward model")
        if not 0 <= h.dropout <= 1 / 3:
            raise ValueError(f"hive.dropout={h.dropout}: must be in [0, 1/3] (three disjoint cases of that size)")
        _sizes(config)
        self.config, self.pipe, self.mesh, self.mode = config, pipe, mesh, h.mode
        self.total = t.samples_per_update
        self.per_call = h.encode_batch or self.total
        context = (f"train.samples_per_update {self.total}, hive.encode_batch {h.encode_batch}, "
                   f"train.micro_batch {t.micro_batch}, {mesh.size} devices")
        check_multiple("train.samples_per_update", self.total, self.per_call, context)
        check_multiple("hive.encode_batch", self.per_call, mesh.size, context)
        check_multiple("train.samples_per_update", self.total, t.micro_batch, context)
        self.examples_per_call = self.per_call
        self.prepare = make_prepare(pipe, config)
        self.step = make_step(config, pipe, policy, optimizer, self.total, mesh)
        self.evaluator = make_evaluator(pipe, config, parallel.layout(config, mesh))
        self.uncond = parallel.replicate(pipe.encode_text([""]), mesh)
        self.thresholds: np.ndarray | None = None

    # ---- prompts
    def prompts(self, index, ids, *, heldout: bool = False) -> list[str]:
        """The instructions of examples ``ids``; condition mode: with their reward level (level 5 held out)."""
        out = [index.instructions[i] for i in ids]
        if self.mode != "condition":
            return out
        if heldout:
            return [hive.with_quality(p) for p in out]
        levels = hive.reward_levels([index.rewards[i] for i in ids], self.thresholds)
        return [hive.with_quality(p, k) for p, k in zip(out, levels)]

    def collect(self, params, loader, key) -> dict:
        """Loads, augments and encodes one update's examples (``params`` is not needed: no sampling)."""
        index = loader.index
        if self.mode == "condition" and self.thresholds is None:  # once, from the whole training set
            self.thresholds = hive.reward_thresholds(index.rewards)
        parts = {k: [] for k in ("z0", "latents", "text", "index")}
        grid_images = None
        for c in range(self.total // self.per_call):
            local = next(loader)
            text = np.asarray(self.pipe.encode_text(self.prompts(index, local["index"])))
            image, edited, mask, text = shard_batch(self.mesh, local["image"], local["edited"], local["mask"], text)
            z0, latents, image_aug, edited_aug = self.prepare(self.pipe.vae_params, image, edited, mask,
                                                              jax.random.fold_in(key, c))
            parts["z0"].append(z0), parts["latents"].append(latents), parts["text"].append(text)
            parts["index"].append(gather_examples({"index": local["index"]})["index"])
            if grid_images is None:
                grid_images = (to_host(image_aug), to_host(edited_aug))
        ids = np.concatenate(parts["index"])
        rewards = np.asarray([index.rewards[i] for i in ids] if index.rewards else np.zeros(len(ids)), np.float32)
        cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
        ph = {"z0": cat(parts["z0"]), "image_latents": cat(parts["latents"]), "text": cat(parts["text"]),
              "rewards": rewards, "index": ids}
        ph["metrics"] = {"data/examples": float(len(ids))}
        ph["postfix"] = {}
        if index.rewards:
            ph["metrics"].update({"data/reward_mean": float(rewards.mean()), "data/reward_std": float(rewards.std())})
            ph["postfix"]["R"] = f"{rewards.mean():.4f}"
        if self.mode == "condition":
            levels = hive.reward_levels(rewards, self.thresholds)
            ph["metrics"]["data/level_mean"] = float(levels.mean())
        ph["grid"] = ("input_target", [[grid_images[0][i], grid_images[1][i]]
                                       for i in range(min(4, len(grid_images[0])))])
        return ph

    def update(self, state, ref_params, ph: dict, key):
        """One supervised / weighted step -> (state, metrics {name: float}, skipped)."""
        eta = self.config.hive.eta if self.mode == "weighted" else 0.0
        batch = hive.SFTBatch(ph["z0"], ph["image_latents"], ph["text"], jnp.asarray(ph["rewards"]),
                              jnp.asarray(eta, jnp.float32))
        state, m = self.step(state, ref_params, batch, self.uncond, key)
        m = {f"sft/{k}": float(v) for k, v in jax.device_get(m).items()}  # awaits the step
        return state, m, m["sft/skipped"] > 0

    def evaluate(self, params, heldout: list, index, key) -> dict:
        """Held-out edits with fixed noise vs the target edits (module docstring); ``params`` are
        what the loop evaluates: the EMA weights (`model_trainable`)."""
        out: dict[str, list] = {}
        for b, batch in enumerate(heldout):
            text = np.asarray(self.pipe.encode_text(self.prompts(index, batch["index"], heldout=True)))
            image, edited, text = shard_batch(self.mesh, batch["image"], batch["edited"], text)
            _, m = self.evaluator(params, self.pipe.vae_params, image, edited, text, self.uncond,
                                  jax.random.fold_in(key, b))
            for k, v in m.items():
                out.setdefault(k, []).append(to_host(v))
        return {f"heldout/{k}": float(np.mean(np.concatenate(v))) for k, v in out.items()}

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['sft/loss']:.4f}"}

    # ---- what the loop evaluates and saves
    @staticmethod
    def model_trainable(state):
        """The EMA of the trained tree when kept (``hive.ema_decay`` > 0), else the trained tree."""
        ema = hive.find_ema(state.opt_state)
        return state.params if ema is None else ema.ema

    @staticmethod
    def quantiles(method_state: dict) -> dict | None:
        """The condition mode's quantisation from a ``get_state()`` dict (None before the thresholds
        exist / other modes)."""
        if method_state.get("mode") != "condition" or method_state.get("thresholds") is None:
            return None
        return {"thresholds": [float(x) for x in method_state["thresholds"]], "levels": list(hive.QUALITY_WORDS),
                "rule": "level K = 1 + number of thresholds <= reward (20/40/60/80 % quantiles of the training "
                        "rewards); instruction + ', image quality is K out of five'",
                "sample_suffix": hive.quality_suffix(hive.LEVELS)}

    @staticmethod
    def write_model_extras(folder: str, method_state: dict) -> None:
        """Writes ``hive_quantiles.json`` next to a saved model (condition mode), from the method's
        ``get_state()`` (the loop's, or a checkpoint's for `jaxedit.export`)."""
        q = SFT.quantiles(method_state)
        if q is not None:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, QUANTILES_FILE), "w") as f:
                json.dump(q, f, indent=2)

    def get_state(self) -> dict:
        th = None if self.thresholds is None else [float(x) for x in self.thresholds]
        return {"mode": self.mode, "thresholds": th}

    def set_state(self, state: dict) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"the checkpoint was trained with hive.mode={state['mode']!r}, this run has {self.mode!r}")
        th = state.get("thresholds")
        self.thresholds = None if th is None else np.asarray(th, np.float64)
