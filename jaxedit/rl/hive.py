"""Supervised instruction training and HIVE's reward losses, as pure functions (JAX + NumPy).

Supervised step (InstructPix2Pix; HIVE step 1), per sample i of a batch of N triples
(input I_in, instruction c_T, edited I_edit):

    z_0 = 0.18215 · E(I_edit)            (a VAE posterior SAMPLE, as InstructPix2Pix's
                                          `get_first_stage_encoding` and diffusers'
                                          `train_instruct_pix2pix.py`: `latent_dist.sample()`)
    c_I = E(I_in)                        (posterior MODE, unscaled: `pipeline.encode_images`)
    t ~ U{0, ..., T−1},  ε ~ N(0, I),  z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε
    l_i = mean_{h,w,c} (ε_θ([z_t, c_I], t, c_T) − ε)²            (`denoising_loss`)

Conditioning dropout (`dropout_conditioning`, InstructPix2Pix's scheme: ONE uniform draw r per
sample, p = 0.05): r < p drops the text only, p ≤ r < 2p drops both, 2p ≤ r < 3p drops the image
only; a dropped text is the CLIP embedding of "", a dropped image a zero latent. So 5% text only,
5% image only, 5% both, 85% nothing.

HIVE step 3 (rewards R_i precomputed by the reward model):
- weighted reward loss (`weighted_loss`): ``L = mean_i(w_i · l_i)`` with
  ``w = N · softmax(R/η)`` over the N samples of the UPDATE (all its micro-batches), i.e.
  ``w_i = exp(R_i/η) / mean_j exp(R_j/η)``: the weights are normalised to MEAN 1 over the batch
  (equivalently L = Σ_i softmax(R/η)_i · l_i), so equal rewards give exactly the plain loss.
  HIVE's code multiplies the per-sample MSE by precomputed weights (`weighted_MSELoss`); the
  normalisation over the batch follows DESIGN.md.
- condition reward loss (`reward_thresholds`, `reward_levels`, `with_quality`): R is quantised
  into 5 levels by the 20/40/60/80 % quantiles of the rewards of the whole training set
  (``np.quantile``, linear interpolation), level K = 1 + #{thresholds ≤ R} ∈ 1..5, and the
  instruction becomes ``"<instruction>, image quality is K out of five"`` with K spelled out
  (HIVE's `edit_cli_rw_label.py`: ``edit + ', ' + 'image quality is five out of five'``).
  Sampling and evaluation use level five.

EMA of the weights (`ema_weights`): an optax transformation appended to the optimizer, so the
EMA lives in the optimizer state (checkpointed with it, unchanged by a skipped update):
``ema ← ema − (1 − d)·(ema − θ_new)`` with ``d = min(decay, (1 + n)/(10 + n))`` after the n-th
applied update when ``warmup`` (latent diffusion's `LitEma`, which InstructPix2Pix and HIVE train
with, decay 0.9999), else ``d = decay``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxedit.parallel import Layout
from jaxedit.rl.update import accumulate, apply_if_finite, chunked

#: Reward levels of the condition reward loss, spelled as HIVE's prompt does.
QUALITY_WORDS = ("one", "two", "three", "four", "five")
LEVELS = len(QUALITY_WORDS)


# ------------------------------------------------------------------------------ conditioning
def dropout_conditioning(key, text_emb, image_latents, uncond_emb, prob: float = 0.05):
    """InstructPix2Pix conditioning dropout (see the module docstring).

    text_emb (N,L,D); image_latents (N,h,w,c); uncond_emb: the "" embedding, (L,D) or (1,L,D).
    Returns (text (N,L,D), image (N,h,w,c), drop_text (N,) bool, drop_image (N,) bool).
    """
    r = jax.random.uniform(key, (text_emb.shape[0],))
    drop_text = r < 2 * prob
    drop_image = (r >= prob) & (r < 3 * prob)
    un = jnp.broadcast_to(jnp.asarray(uncond_emb, text_emb.dtype).reshape(text_emb.shape[-2:]), text_emb.shape)
    text = jnp.where(drop_text[:, None, None], un, text_emb)
    image = jnp.where(drop_image[:, None, None, None], jnp.zeros_like(image_latents), image_latents)
    return text, image, drop_text, drop_image


# ------------------------------------------------------------------------------------ losses
def add_noise(alphas_cumprod, z0, noise, t):
    """z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε, t (N,) int."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t].reshape((-1,) + (1,) * (z0.ndim - 1))
    return jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * noise


def denoising_loss(apply_fn: Callable, params, z0, image_latents, text_emb, t, noise, alphas_cumprod):
    """Per-sample ε-prediction MSE (N,) float32, mean over h, w, c.

    apply_fn(params, model_in (N,h,w,4+c), t (N,), context (N,L,D)) -> ε̂ (N,h,w,4): the U-Net;
    model_in = [z_t, image_latents] on the channel axis (InstructPix2Pix's concat conditioning).
    """
    z_t = add_noise(alphas_cumprod, z0, noise, t)
    model_in = jnp.concatenate([z_t, jnp.asarray(image_latents, z_t.dtype)], axis=-1)
    eps = apply_fn(params, model_in, t, text_emb)
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise.astype(jnp.float32)), axis=tuple(range(1, z0.ndim)))


def reward_weights(rewards, eta: float):
    """w = exp(R/η) normalised to mean 1 over the batch: N·softmax(R/η) (N,) float32."""
    r = jnp.asarray(rewards, jnp.float32)
    return r.shape[0] * jax.nn.softmax(r / eta)


def weighted_loss(per_sample, rewards, eta: float):
    """HIVE's weighted reward loss: (mean_i w_i·l_i, w) with w = `reward_weights` (constants)."""
    w = jax.lax.stop_gradient(reward_weights(rewards, eta))
    return jnp.mean(w * per_sample), w


# ------------------------------------------------------------------------------ quantisation
def reward_thresholds(rewards, levels: int = LEVELS) -> np.ndarray:
    """The levels−1 quantile thresholds (float64) of the reward distribution (20/40/60/80 %)."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError(f"rewards: expected a non-empty 1-D array of finite values, got shape {r.shape}")
    return np.quantile(r, np.arange(1, levels) / levels)


def reward_levels(rewards, thresholds) -> np.ndarray:
    """Level K = 1 + #{thresholds ≤ R} ∈ 1..len(thresholds)+1 of each reward (int64)."""
    return 1 + np.searchsorted(np.asarray(thresholds, np.float64), np.asarray(rewards, np.float64), side="right")


def quality_suffix(level: int) -> str:
    """", image quality is K out of five" with K spelled out (level 1..5)."""
    if not 1 <= level <= LEVELS:
        raise ValueError(f"quality level {level} not in 1..{LEVELS}")
    return f", image quality is {QUALITY_WORDS[level - 1]} out of five"


def with_quality(instruction: str, level: int = LEVELS) -> str:
    """The instruction with its reward level appended (level 5 for sampling)."""
    return instruction.rstrip().rstrip(".") + quality_suffix(int(level))


# -------------------------------------------------------------------------------- augmentation
def random_crop_flip(key, arrays: dict, size: int, min_size: int, flip_prob: float = 0.5) -> dict:
    """InstructPix2Pix's crop augmentation on device: per sample, resize the (B,L,L[,C]) inputs to
    a random s ∈ {min_size..L} (bilinear, antialiased; s = L is an exact copy), take a random
    size x size crop of it, and flip it horizontally with probability ``flip_prob``; every array
    of a sample gets the SAME resize, crop and flip. Returns float32 arrays (B,size,size[,C]).
    """
    first = next(iter(arrays.values()))
    b, big = first.shape[0], first.shape[1]
    if not size <= min_size <= big:
        raise ValueError(f"crop augmentation: need size {size} <= min_size {min_size} <= input size {big}")

    def one(k, *xs):
        ks, ky, kx, kf = jax.random.split(k, 4)
        s = jax.random.randint(ks, (), min_size, big + 1)
        oy = jax.random.randint(ky, (), 0, s - size + 1)
        ox = jax.random.randint(kx, (), 0, s - size + 1)
        flip = jax.random.uniform(kf) < flip_prob
        scale = jnp.full((2,), s / big, jnp.float32)
        shift = -jnp.stack([oy, ox]).astype(jnp.float32)
        out = []
        for x in xs:
            x = x.astype(jnp.float32)
            y = jax.image.scale_and_translate(x, (size, size) + x.shape[2:], (0, 1), scale, shift, "linear",
                                              antialias=True)
            out.append(jnp.where(flip, y[:, ::-1], y))
        return tuple(out)

    outs = jax.vmap(one)(jax.random.split(key, b), *arrays.values())
    return dict(zip(arrays.keys(), outs))


# ------------------------------------------------------------------------------------------ EMA
class EmaState(NamedTuple):
    """count: () int32 applied updates; ema: the EMA of the params (same tree and dtypes)."""
    count: jax.Array
    ema: Any


def ema_weights(decay: float, warmup: bool = True) -> optax.GradientTransformation:
    """An optax transformation (last in a chain) keeping the EMA of the UPDATED params in its
    state; it passes the updates through unchanged. See the module docstring for the rule."""
    def init(params):
        return EmaState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(lambda p: jnp.array(p, copy=True), params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_weights needs the params (optimizer.update(grads, state, params))")
        new = optax.apply_updates(params, updates)
        count = state.count + 1
        n = count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + n) / (10.0 + n)) if warmup else jnp.asarray(decay, jnp.float32)
        ema = jax.tree_util.tree_map(lambda e, p: (e - (1.0 - d) * (e - p)).astype(e.dtype), state.ema, new)
        return updates, EmaState(count, ema)

    return optax.GradientTransformation(init, update)


def find_ema(opt_state) -> Optional[EmaState]:
    """The EmaState inside an optimizer state (chains nest tuples), or None."""
    if isinstance(opt_state, EmaState):
        return opt_state
    if isinstance(opt_state, (tuple, list)):
        for s in opt_state:
            found = find_ema(s)
            if found is not None:
                return found
    return None


# -------------------------------------------------------------------------------------- update
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """One update's N examples: z0 (N,h,w,4) = 0.18215·E(I_edit); image_latents (N,h,w,4) = E(I_in)
    mode unscaled; text_emb (N,L,D) (the instruction, with its quality text in condition mode);
    rewards (N,) float32 (zeros when unused); eta () float32: the weighted loss's η (0 = unweighted)."""
    z0: jax.Array
    image_latents: jax.Array
    text_emb: jax.Array
    rewards: jax.Array
    eta: jax.Array


def make_update(apply_fn: Callable, optimizer: optax.GradientTransformation, alphas_cumprod, num_timesteps: int, *,
                merge: Optional[Callable] = None, micro_batches: int = 1, dropout: float = 0.05,
                layout: Layout = Layout()) -> Callable:
    """The jitted supervised / HIVE update ``update(state, ref_params, batch, uncond, key) -> (state,
    metrics)``: conditioning dropout, t and ε drawn from ``key``, the (weighted) denoising loss of
    the N examples in ``micro_batches`` chunks, the mean gradient accumulated in the compiled
    function, ONE optimizer step (skipped when non-finite). merge(trainable, ref_params) -> U-Net
    params (None: the trainable tree is the params); layout: where the weights, gradients and
    state live on the mesh (``jaxedit.parallel.Layout``; default: XLA chooses). Metrics: loss (the optimised, weighted
    loss), mse (unweighted), grad_norm, skipped, weight_max, drop_text, drop_image. State donated.
    """
    merge = merge if merge is not None else (lambda trainable, ref: trainable)

    def update(state, ref_params, batch: SFTBatch, uncond, key):
        n = batch.z0.shape[0]
        m = micro_batches
        if m < 1 or n % m:
            raise ValueError(f"micro_batches={m} must divide the number of examples {n}")
        k_drop, k_t, k_noise = jax.random.split(key, 3)
        text, image, drop_text, drop_image = dropout_conditioning(k_drop, batch.text_emb, batch.image_latents,
                                                                  uncond, dropout)
        t = jax.random.randint(k_t, (n,), 0, num_timesteps)
        noise = jax.random.normal(k_noise, batch.z0.shape, jnp.float32)
        eta = jnp.asarray(batch.eta, jnp.float32)
        w = jnp.where(eta > 0, reward_weights(batch.rewards, jnp.where(eta > 0, eta, 1.0)), 1.0)
        w = jax.lax.stop_gradient(w)

        def loss_fn(trainable, chunk, idx):
            z0, img, txt, tt, nz, ww = chunk
            per = denoising_loss(apply_fn, layout.gather(merge(trainable, ref_params)), z0, img, txt, tt, nz, alphas_cumprod)
            loss = jnp.mean(ww * per)
            return loss, {"loss": loss, "mse": jnp.mean(per)}

        chunks = tuple(chunked(x, m) for x in (batch.z0, image, text, t, noise, w))
        step_index = jnp.zeros((m, 1, n // m), jnp.int32)  # one "step" per chunk (accumulate's K = 1)
        zero = jnp.zeros((), jnp.float32)
        grads, metrics = accumulate(loss_fn, state.params, chunks, step_index, {"loss": zero, "mse": zero},
                                    layout.fsdp)
        new_state, grad_norm, skipped = apply_if_finite(state, optimizer, grads, metrics["loss"])
        metrics.update(grad_norm=grad_norm, skipped=skipped, weight_max=jnp.max(w),
                       drop_text=jnp.mean(drop_text.astype(jnp.float32)),
                       drop_image=jnp.mean(drop_image.astype(jnp.float32)))
        return layout.fsdp(new_state), metrics

    return jax.jit(update, donate_argnums=0)
