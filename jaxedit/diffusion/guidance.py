"""Classifier-free guidance: InstructPix2Pix (2-way) and Image-Editing Specialists (3-way).

All guidance rows go through ONE denoiser call. Rows are stacked block-wise (each block is the
whole batch B), in order of increasing conditioning:

* InstructPix2Pix, 3B rows: ``[(∅,∅), (c_I,∅), (c_I,c_T)]`` (image, text)
* Specialists,     4B rows: ``[(∅,∅,∅), (c_I,∅,∅), (c_I,c_S,∅), (c_I,c_S,c_T)]`` (image, style, text)

Dropped image = zero image latent; dropped style = zero style latent with ``style_keep = 0``
(the model zeroes its adapter output for that row); dropped text = the embedding of "" (given).
The combinations are written so that with the style dropped (rows 1 and 2 identical) the 3-way
result equals the 2-way one bit for bit: the style term adds exactly zero.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


def _scale(s, e):
    """Guidance scale () or (B,) -> broadcastable against e (B,...)."""
    s = jnp.asarray(s, e.dtype)
    return s.reshape(s.shape + (1,) * (e.ndim - s.ndim)) if s.ndim else s


def _uncond(uncond_emb, text_emb):
    """Embedding of "" (L,D), (1,L,D) or (B,L,D) -> (B,L,D)."""
    return jnp.broadcast_to(jnp.asarray(uncond_emb, text_emb.dtype), text_emb.shape)


# ---------------------------------------------------------------------------------------- 2-way
def ip2p_rows(latents, image_latents, text_emb, uncond_emb):
    """Rows of one InstructPix2Pix call.

    latents, image_latents: (B,h,w,4); text_emb: (B,L,D); uncond_emb: (L,D)|(1,L,D)|(B,L,D).
    Returns (model_in (3B,h,w,8) = [z_t, E(I_in) or 0], context (3B,L,D)), rows
    ``[(∅,∅), (c_I,∅), (c_I,c_T)]``.
    """
    img = jnp.asarray(image_latents, latents.dtype)
    z3 = jnp.concatenate([latents] * 3, axis=0)
    img3 = jnp.concatenate([jnp.zeros_like(img), img, img], axis=0)
    un = _uncond(uncond_emb, text_emb)
    return jnp.concatenate([z3, img3], axis=-1), jnp.concatenate([un, un, text_emb], axis=0)


def ip2p_combine(eps_rows, s_text, s_image):
    """e(∅,∅) + s_I·(e(c_I,∅) − e(∅,∅)) + s_T·(e(c_I,c_T) − e(c_I,∅)).

    eps_rows: (3B,...) in ``ip2p_rows`` order; s_text, s_image: () or (B,). Returns (B,...).
    """
    e0, e1, e2 = jnp.split(eps_rows, 3, axis=0)
    return e0 + _scale(s_image, e0) * (e1 - e0) + _scale(s_text, e0) * (e2 - e1)


# ---------------------------------------------------------------------------------------- 3-way
class SpecialistRows(NamedTuple):
    """Inputs of one Specialists call (4B rows): z (4B,h,w,4), image (4B,h,w,4), style (4B,h,w,4),
    style_keep (4B,) float32 (0 = style dropped), context (4B,L,D)."""
    z: jax.Array
    image: jax.Array
    style: jax.Array
    style_keep: jax.Array
    context: jax.Array


def specialist_rows(latents, image_latents, style_latents, text_emb, uncond_emb, style_keep=None):
    """Rows ``[(∅,∅,∅), (c_I,∅,∅), (c_I,c_S,∅), (c_I,c_S,c_T)]`` of one Specialists call.

    latents, image_latents: (B,h,w,4); style_latents: (B,h,w,4) or None (style dropped for all);
    text_emb: (B,L,D); uncond_emb: (L,D)|(1,L,D)|(B,L,D); style_keep: () or (B,) (default 1;
    0 drops a sample's style). Rows without style get a zero style latent and style_keep 0.
    """
    b = latents.shape[0]
    img = jnp.asarray(image_latents, latents.dtype)
    if style_latents is None:
        sty, keep = jnp.zeros_like(img), jnp.zeros((b,), jnp.float32)
    else:
        sty = jnp.asarray(style_latents, latents.dtype)
        keep = jnp.broadcast_to(jnp.asarray(1.0 if style_keep is None else style_keep, jnp.float32), (b,))
    zero, off = jnp.zeros_like(img), jnp.zeros((b,), jnp.float32)
    un = _uncond(uncond_emb, text_emb)
    return SpecialistRows(
        z=jnp.concatenate([latents] * 4, axis=0),
        image=jnp.concatenate([zero, img, img, img], axis=0),
        style=jnp.concatenate([zero, zero, sty, sty], axis=0),
        style_keep=jnp.concatenate([off, off, keep, keep], axis=0),
        context=jnp.concatenate([un, un, un, text_emb], axis=0))


def specialist_combine(eps_rows, s_text, s_image, s_style):
    """e0 + s_I·(e1 − e0) + s_S·(e2 − e1) + s_T·(e3 − e2), rows as ``specialist_rows``.

    eps_rows: (4B,...); scales () or (B,). Returns (B,...). Same evaluation order as
    ``ip2p_combine``, so e2 == e1 (style dropped) gives exactly the 2-way result.
    """
    e0, e1, e2, e3 = jnp.split(eps_rows, 4, axis=0)
    return (e0 + _scale(s_image, e0) * (e1 - e0) + _scale(s_style, e0) * (e2 - e1)
            + _scale(s_text, e0) * (e3 - e2))


# ------------------------------------------------------------------- denoisers for the sampler
class IP2PCond(NamedTuple):
    """Traced conditioning of an InstructPix2Pix denoiser (see ``ip2p_rows``); scales () or (B,)."""
    image_latents: jax.Array
    text_emb: jax.Array
    uncond_emb: jax.Array
    s_text: Any = 7.5
    s_image: Any = 1.5


class SpecialistCond(NamedTuple):
    """Traced conditioning of a Specialists denoiser (see ``specialist_rows``)."""
    image_latents: jax.Array
    style_latents: jax.Array
    text_emb: jax.Array
    uncond_emb: jax.Array
    style_keep: Any = 1.0
    s_text: Any = 7.5
    s_image: Any = 1.5
    s_style: Any = 3.0


def _row_timesteps(t, batch: int, blocks: int):
    """Timestep () or (B,) -> (blocks·B,) for block-stacked guidance rows."""
    t = jnp.asarray(t)
    return jnp.tile(jnp.broadcast_to(t, (batch,)), blocks)


def _with_aux(combine, out, with_aux: bool):
    """combine(eps_rows), passing an apply_fn's (eps_rows, aux) pair through when ``with_aux``."""
    return (combine(out[0]), out[1]) if with_aux else combine(out)


def ip2p_denoiser(apply_fn: Callable, with_aux: bool = False) -> Callable:
    """Sampler denoiser ``(params, IP2PCond, x (B,h,w,4), t () or (B,)) -> eps (B,h,w,4)``.

    apply_fn(params, sample (3B,h,w,8), timesteps (3B,), context (3B,L,D)) -> eps (3B,h,w,4)
    (with ``with_aux``: -> (eps, aux), and the denoiser returns (eps (B,h,w,4), aux) with aux
    untouched, e.g. sown attention probabilities of all 3B rows).
    Build it once and reuse the same object: the sampler's jit is keyed on it.
    """
    def denoise(params, cond: IP2PCond, x, t):
        model_in, context = ip2p_rows(x, cond.image_latents, cond.text_emb, cond.uncond_emb)
        ts = _row_timesteps(t, x.shape[0], 3)
        return _with_aux(lambda e: ip2p_combine(e, cond.s_text, cond.s_image), apply_fn(params, model_in, ts, context),
                         with_aux)
    return denoise


def specialist_denoiser(apply_fn: Callable, with_aux: bool = False) -> Callable:
    """Sampler denoiser ``(params, SpecialistCond, x (B,h,w,4), t () or (B,)) -> eps (B,h,w,4)``.

    apply_fn(params, z, image, style, timesteps (4B,), context, style_keep (4B,)) -> eps (4B,h,w,4)
    (the argument order of ``StyleConditionedUNet``; ``with_aux`` as ``ip2p_denoiser``). Build once
    and reuse.
    """
    def denoise(params, cond: SpecialistCond, x, t):
        r = specialist_rows(x, cond.image_latents, cond.style_latents, cond.text_emb, cond.uncond_emb,
                            cond.style_keep)
        ts = _row_timesteps(t, x.shape[0], 4)
        out = apply_fn(params, r.z, r.image, r.style, ts, r.context, r.style_keep)
        return _with_aux(lambda e: specialist_combine(e, cond.s_text, cond.s_image, cond.s_style), out, with_aux)
    return denoise
