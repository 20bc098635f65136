"""PPO with a cross-attention-map reward (InstructRL4Pix, on DDPO's recipe).

Each update: ``train.samples_per_update`` DDIM trajectories (``sample.batch_size`` per call) of
(input, mask, instruction) examples, each with its own instruction. The compiled sampler also
returns the instruction's cross-attention map a_2 (`jaxedit.diffusion.attention_maps`) and the
reward ``r = cos(a_1, a_2) + α·MAE(I_in, I_gen)·[MAE > τ]`` (`jaxedit.rewards.attention`), a_1 the
edit mask at the map's resolution: nothing but one map and a few scalars per image leaves the
device. Advantages come from the per-prompt stat tracker (checkpointed); then
``train.inner_epochs`` PPO steps (`jaxedit.rl.ppo`), each over all samples with a new random
step order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import parallel
from jaxedit.data import images as imio
from jaxedit.diffusion import guidance
from jaxedit.diffusion.sampler import sample
from jaxedit.rewards.attention import cosine, mask_to_map
from jaxedit.rewards.pixel import clipped_mae
from jaxedit.rl import ppo
from jaxedit.rl.advantages import PromptStatTracker
from jaxedit.trainers.common import check_multiple, gather_examples, shard_batch, to_host

COND_AXES = guidance.IP2PCond(0, 0, None, None, None)  # per-sample latents and instruction


def make_sampler(pipe, config, layout: parallel.Layout = parallel.Layout()):
    """Jitted sampling call: B (image, mask, instruction) examples -> B samples and their rewards.

    ``run(params, vae_params, image uint8 (B,H,W,3), mask (B,H,W), text_emb (B,77,D), token_weights
    (B,77), uncond (1,77,D), key)`` -> (cond, Trajectory (S,B,...), samples float (B,H,W,3) in
    [-1,1], maps (B,h,w), {"reward", "attention_cos", "clipped_mae"}: (B,) each).
    """
    r, s = config.reward, config.sample
    denoise = pipe.attention_denoiser(r.attention_downsample)

    def run(params, vae_params, image, mask, text_emb, weights, uncond, key):
        params = layout.gather(params)  # whole weights, samples split over the devices
        inputs = imio.to_model(image)
        latents = pipe.encode_images(inputs, vae_params)
        cond = guidance.IP2PCond(latents, text_emb, uncond[0], s.guidance_text, s.guidance_image)
        z = jax.random.normal(jax.random.fold_in(key, 0), latents.shape)
        x0, traj, maps = sample(denoise, params, (cond, weights), pipe.schedule, z, jax.random.fold_in(key, 1),
                                steps=s.steps, sampler="ddim", eta=s.eta, return_trajectory=True, aux=True)
        x = jnp.clip(pipe.decode(x0, vae_params), -1.0, 1.0)
        cos = cosine(mask_to_map(mask, maps.shape[1:]), maps)
        mae = clipped_mae(inputs, x, r.tau)
        return cond, traj, x, maps, {"reward": cos + r.alpha * mae, "attention_cos": cos, "clipped_mae": mae}
    return jax.jit(run)


def make_step(config, pipe, policy, optimizer, samples: int, mesh=None):
    """The jitted PPO step over ``samples`` samples as configured (`jaxedit.rl.ppo.make_update`);
    with ``mesh``, its state and gradients are pinned to the FSDP shardings (`jaxedit.parallel`)."""
    t = config.train
    return ppo.make_update(pipe.denoise, optimizer, pipe.schedule, clip_range=t.clip_range, adv_clip=t.adv_clip,
                           eta=config.sample.eta, steps_per_update=max(1, int(config.sample.steps * t.timestep_fraction)),
                           merge=policy.merge, cond_axes=COND_AXES, micro_batches=samples // t.micro_batch,
                           layout=parallel.layout(config, mesh))


def _gray(m, size=None) -> np.ndarray:
    """A map (h, w) >= 0 -> uint8 (H, W, 3) for image grids, scaled to its maximum and enlarged
    by pixel repetition to ``size`` (a multiple of (h, w))."""
    m = np.asarray(m, np.float64)
    if size is not None:
        m = np.repeat(np.repeat(m, size[0] // m.shape[0], 0), size[1] // m.shape[1], 1)
    return np.repeat(np.round(255 * m / max(m.max(), 1e-12)).astype(np.uint8)[..., None], 3, -1)


class PPO:
    """The PPO method for `jaxedit.train` (see the module docstring)."""
    name = "ppo"

    def __init__(self, config, pipe, policy, mesh, optimizer, scorer=None):
        if pipe.style:
            raise ValueError("method ppo trains InstructPix2Pix models: set --config.model.style_adapter=False")
        t = config.train
        self.config, self.pipe, self.mesh = config, pipe, mesh
        self.total, self.per_call = t.samples_per_update, config.sample.batch_size
        context = (f"train.samples_per_update {self.total}, sample.batch_size {self.per_call}, "
                   f"train.micro_batch {t.micro_batch}, {mesh.size} devices")
        check_multiple("train.samples_per_update", self.total, self.per_call, context)
        check_multiple("sample.batch_size", self.per_call, mesh.size, context)
        check_multiple("train.samples_per_update", self.total, t.minibatches, context + f", {t.minibatches} minibatches")
        self.per_step = self.total // t.minibatches
        check_multiple("samples per PPO step", self.per_step, t.micro_batch, context + f", {t.minibatches} minibatches")
        self.examples_per_call = self.per_call
        self.sampler = make_sampler(pipe, config, parallel.layout(config, mesh))
        self.step = make_step(config, pipe, policy, optimizer, self.per_step, mesh)
        self.tracker = PromptStatTracker(t.tracker_buffer, t.tracker_min_count)
        self.uncond = parallel.replicate(pipe.encode_text([""]), mesh)

    def _calls(self, params, batches, instructions, calls: int, key) -> dict:
        """``calls`` sampling calls on loader batches -> trajectories, rewards and examples of all
        their samples; ``instructions``: the dataset's, indexed by the batches' ``index``."""
        out = {k: [] for k in ("cond", "traj", "samples", "maps", "rewards", "examples", "instructions")}
        for c in range(calls):
            local = next(batches)
            prompts = [instructions[i] for i in local["index"]]
            text = np.asarray(self.pipe.encode_text(prompts))
            args = shard_batch(self.mesh, local["image"], local["mask"], text,
                               self.pipe.instruction_token_weights(prompts))
            cond, traj, x, maps, rewards = self.sampler(params, self.pipe.vae_params, *args, self.uncond,
                                                        jax.random.fold_in(key, c))
            ex = gather_examples(local)
            out["cond"].append(cond), out["traj"].append(traj), out["examples"].append(ex)
            out["samples"].append(imio.from_model(to_host(x))), out["maps"].append(to_host(maps))
            out["rewards"].append({k: to_host(v) for k, v in rewards.items()})
            out["instructions"] += [instructions[i] for i in ex["index"]]
        cat = lambda *xs: jnp.concatenate(xs)
        return {"cond": jax.tree_util.tree_map(lambda ax, *cs: cs[0] if ax is None else cat(*cs), COND_AXES,
                                               *out["cond"], is_leaf=lambda x: x is None),
                "x_t": jnp.concatenate([t.x_t for t in out["traj"]], axis=1),
                "x_prev": jnp.concatenate([t.x_prev for t in out["traj"]], axis=1),
                "log_prob": jnp.concatenate([t.log_prob for t in out["traj"]], axis=1),
                "t": out["traj"][0].t,
                "rewards": {k: np.concatenate([r[k] for r in out["rewards"]]) for k in out["rewards"][0]},
                "samples": np.concatenate(out["samples"]), "maps": np.concatenate(out["maps"]),
                "examples": {k: np.concatenate([e[k] for e in out["examples"]]) for k in out["examples"][0]},
                "instructions": out["instructions"]}

    def collect(self, params, loader, key) -> dict:
        ph = self._calls(params, loader, loader.index.instructions, self.total // self.per_call, key)
        rewards = ph["rewards"]
        ph["advantages"] = self.tracker.update(ph["instructions"], rewards["reward"]).astype(np.float32)
        ph["metrics"] = {**{f"reward/{k}_mean": float(np.mean(v)) for k, v in rewards.items()},
                         "reward/reward_std": float(np.std(rewards["reward"])),
                         "reward/prompts": float(len(set(ph["instructions"])))}
        ph["postfix"] = {"reward": f"{np.mean(rewards['reward']):.4f}"}
        ex = ph["examples"]
        ph["grid"] = ("input_mask_sample_attention",
                      [[ex["image"][i], _gray(ex["mask"][i]), ph["samples"][i], _gray(ph["maps"][i], ex["mask"][i].shape)]
                       for i in range(min(4, len(ph["samples"])))])
        return ph

    def update(self, state, ref_params, ph: dict, key):
        """``train.inner_epochs`` passes over the samples, each shuffled and split into
        ``train.minibatches`` PPO steps -> (state, metrics averaged over the steps, any skipped)."""
        t = self.config.train
        adv = jnp.asarray(ph["advantages"])
        ms = []
        for e in range(t.inner_epochs):
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), self.total))
            for j in range(t.minibatches):
                idx = jnp.asarray(perm[j * self.per_step:(j + 1) * self.per_step])
                cond = jax.tree_util.tree_map(lambda ax, c: c if ax is None else c[idx], COND_AXES, ph["cond"],
                                              is_leaf=lambda x: x is None)
                batch = ppo.PPOBatch(ph["x_t"][:, idx], ph["x_prev"][:, idx], ph["t"], ph["log_prob"][:, idx],
                                     cond, adv[idx])
                state, m = self.step(state, ref_params, batch, jax.random.fold_in(key, 1000 * e + j + 1))
                ms.append({k: float(v) for k, v in jax.device_get(m).items()})  # awaits each step
        m = {f"ppo/{k}": float(np.mean([x[k] for x in ms])) for k in ms[0]}
        return state, m, m["ppo/skipped"] > 0

    def evaluate(self, params, heldout: list, index, key) -> dict:
        ph = self._calls(params, iter(heldout), index.instructions, len(heldout), key)
        return {f"heldout/{k}_mean": float(np.mean(v)) for k, v in ph["rewards"].items()}

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['ppo/loss']:.4f}", "kl": f"{metrics['ppo/approx_kl']:.2g}"}

    def get_state(self) -> dict:
        return {"tracker": self.tracker.get_state()}

    def set_state(self, state: dict) -> None:
        self.tracker.set_state(state["tracker"])
