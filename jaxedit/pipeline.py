"""EditPipeline: the one object users hold to edit images with an instruction (and a style).

    pipe = EditPipeline.from_pretrained("/data/instruct-pix2pix")
    out = pipe.edit([img], ["make it snow"], steps=20, sampler="euler_ancestral", seed=0)

Loads a diffusers-format checkpoint (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``); a
``style_adapter/`` folder next to a 12-channel ``unet/`` makes it an Image-Editing Specialists
model, which then takes style images. Each stage (text encoder, VAE encoder, sampler, VAE
decoder) is jitted once per shape.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxedit.data import images as imio
from jaxedit.diffusion import attention_maps, guidance, sampler as sampling
from jaxedit.diffusion.schedules import Schedule
from jaxedit.models import load, style_adapter, text
from jaxedit.models.attention import ATTENTION_PROBS
from jaxedit.models.state_dict import CheckpointError

SAMPLERS = sampling.SAMPLERS


@dataclasses.dataclass
class EditPipeline:
    """Models, parameters, tokenizer and noise schedule of an editing model.

    `denoiser_params` is ``unet_params`` for InstructPix2Pix or ``{"unet", "style_adapter"}``
    params for a Specialists model (``style`` is then True).
    """
    unet: Any
    denoiser_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    schedule: Schedule
    scheduler_config: dict
    style: bool = False

    def __post_init__(self):
        self._encode_text = jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids)[0])
        self._encode_image = jax.jit(lambda p, x: self.vae.apply({"params": p}, x, method=self.vae.encode).mode())
        self._decode = jax.jit(lambda p, z: self.vae.apply({"params": p}, z, method=self.vae.decode))
        # The sampler's denoiser (guidance included): build once, its jit is keyed on this object.
        make = guidance.specialist_denoiser if self.style else guidance.ip2p_denoiser
        self.denoise = make(lambda p, *a: self.unet.apply({"params": p}, *a))
        self._recording = make(lambda p, *a: self.unet.apply({"params": p}, *a, mutable=[ATTENTION_PROBS]),
                               with_aux=True)
        self._attention_denoisers: dict[int, Callable] = {}

    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32, variant: str | None = None,
                        remat: bool | str = False) -> "EditPipeline":
        """Loads a diffusers-format InstructPix2Pix folder (or one with ``style_adapter/``).
        ``dtype``: compute dtype (params stay fp32); ``remat``: see `with_remat`."""
        return cls._load(path, dtype=dtype, variant=variant).with_remat(remat)

    @classmethod
    def _load(cls, path: str, *, dtype, variant) -> "EditPipeline":
        ckpt = load.load_checkpoint(path, dtype=dtype, variant=variant)
        schedule = Schedule.from_config(ckpt.scheduler_config)
        adapter_dir = os.path.join(path, "style_adapter")
        if os.path.isdir(adapter_dir):
            adapter, adapter_params = load.load_style_adapter(adapter_dir, dtype=dtype)
            if ckpt.unet.config.in_channels != 12:
                raise CheckpointError(f"{path}: a style adapter needs a 12-channel U-Net, "
                                      f"got in_channels={ckpt.unet.config.in_channels}")
            unet = style_adapter.StyleConditionedUNet(ckpt.unet.config, adapter.config, dtype)
            params = {"unet": ckpt.unet_params, "style_adapter": adapter_params}
            return cls(unet, params, ckpt.vae, ckpt.vae_params, ckpt.text_encoder, ckpt.text_params,
                       ckpt.tokenizer, schedule, ckpt.scheduler_config, style=True)
        if ckpt.unet.config.in_channels != 8:
            raise CheckpointError(f"{path}: an InstructPix2Pix U-Net takes 8 input channels, "
                                  f"got in_channels={ckpt.unet.config.in_channels}")
        return cls(ckpt.unet, ckpt.unet_params, ckpt.vae, ckpt.vae_params, ckpt.text_encoder,
                   ckpt.text_params, ckpt.tokenizer, schedule, ckpt.scheduler_config)

    def with_remat(self, remat: bool | str = "full") -> "EditPipeline":
        """The same model with each U-Net block rematerialised in the backward pass (activations
        recomputed instead of stored: less memory, more compute; `unet.REMAT_POLICIES`); identical
        outputs and gradients."""
        if self.unet.remat == remat:
            return self
        return dataclasses.replace(self, unet=self.unet.clone(remat=remat))

    def with_style_adapter(self, config: style_adapter.Config | None = None, *, key) -> "EditPipeline":
        """This InstructPix2Pix pipeline turned into a fresh Specialists one (12 channels + adapter).

        The new conv_in channels are zero, so it edits exactly as before until it is trained.
        """
        if self.style:
            raise ValueError("this pipeline already has a style adapter")
        unet, params = style_adapter.from_instruct_pix2pix(self.unet.config, self.denoiser_params, config, key=key,
                                                           dtype=self.unet.dtype)
        return dataclasses.replace(self, unet=unet.clone(remat=self.unet.remat), denoiser_params=params, style=True)

    def save_pretrained(self, folder: str, denoiser_params=None) -> None:
        """Writes a checkpoint folder that `from_pretrained` loads (diffusers layout; the U-Net,
        VAE and text encoder load in diffusers/transformers too; plus ``style_adapter/``)."""
        import json
        params = self.denoiser_params if denoiser_params is None else denoiser_params
        unet_params = params["unet"] if self.style else params
        config = self.unet.unet_config if self.style else self.unet.config
        load.export_unet(unet_params, config, os.path.join(folder, "unet"))
        if self.style:
            load.export_model(params["style_adapter"], self.unet.adapter_config, os.path.join(folder, "style_adapter"))
        load.export_model(self.vae_params, self.vae.config, os.path.join(folder, "vae"))
        load.export_model(self.text_params, self.text_encoder.config, os.path.join(folder, "text_encoder"))
        self.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(self.scheduler_config, f, indent=2)

    def attention_denoiser(self, downsample: int) -> Callable:
        """The denoiser that also returns the instruction's cross-attention map (same eps as
        ``denoise``): ``(params, (cond, token_weights (B,L)), x, t) -> (eps, map (B,h/d,w/d))``
        with ``d = downsample``; for ``sample(..., aux=True)``, which averages the maps over steps.
        One object per ``downsample`` (the sampler's jit is keyed on it)."""
        if downsample not in self._attention_denoisers:
            def denoise(params, cond_and_weights, x, t):
                cond, weights = cond_and_weights
                eps, sown = self._recording(params, cond, x, t)
                return eps, attention_maps.reduce_maps(sown[ATTENTION_PROBS], weights, x.shape[1:3], downsample)
            self._attention_denoisers[downsample] = denoise
        return self._attention_denoisers[downsample]

    def instruction_token_weights(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, 77) float32 weights averaging a prompt's instruction tokens (not start/end/padding)."""
        length = self.text_encoder.config.max_position_embeddings
        counts = [len(self.tokenizer(p, truncation=True, max_length=length).input_ids) - 2 for p in prompts]
        return attention_maps.instruction_token_weights(counts, length)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> CLIP last hidden states (B, 77, D)."""
        ids = text.tokenize(self.tokenizer, list(prompts), self.text_encoder.config.max_position_embeddings)
        return self._encode_text(self.text_params, jnp.asarray(ids))

    def encode_images(self, images, vae_params=None) -> jax.Array:
        """float (B,H,W,3) in [-1,1] -> conditioning latents (B,H/8,W/8,4): posterior mode, unscaled.

        ``vae_params`` (default ``self.vae_params``): pass them explicitly when calling from inside
        a jitted function, so they are an argument and not a baked-in constant.
        """
        p = self.vae_params if vae_params is None else vae_params
        return self._encode_image(p, jnp.asarray(images, jnp.float32))

    def decode(self, latents, vae_params=None) -> jax.Array:
        """Scaled latents (B,h,w,4) -> images (B,8h,8w,3) in about [-1,1] (``vae_params`` as above)."""
        p = self.vae_params if vae_params is None else vae_params
        return self._decode(p, jnp.asarray(latents) / self.vae.config.scaling_factor)

    def edit_arrays(self, images, instructions: Sequence[str], style_images=None, *, steps: int = 20,
                    sampler: str = "euler_ancestral", guidance_text: float = 7.5, guidance_image: float = 1.5,
                    guidance_style: float = 3.0, eta: float = 1.0, seed: int = 0, image_ids=None,
                    latents=None, noises=None) -> jax.Array:
        """One batch: float images (B,H,W,3) in [-1,1] -> edited float images (B,H,W,3).

        H and W must be multiples of the VAE's factor (8). Row i's initial and per-step noise
        come from ``fold_in(key(seed), image_ids[i])`` (default ids 0..B-1), so an image's edit
        does not depend on which other images share its batch. `latents` (B,h,w,4) and
        `noises` (steps,B,h,w,4) replace them (tests).
        """
        images = jnp.asarray(images, jnp.float32)
        b, h, w, _ = images.shape
        f = self.vae_scale_factor
        if h % f or w % f:
            raise ValueError(f"image size {w}x{h} is not a multiple of {f}")
        if len(instructions) != b:
            raise ValueError(f"{len(instructions)} instructions for {b} images")
        if self.style and style_images is None:
            raise ValueError("this is a style-conditioned model: give style images")
        if not self.style and style_images is not None:
            raise ValueError("this model takes no style images (no style_adapter/ in its checkpoint)")
        text_emb = self.encode_text(list(instructions))
        uncond = self.encode_text([""])
        image_latents = self.encode_images(images)
        ids = np.arange(b) if image_ids is None else np.asarray(image_ids)
        row_latents, row_noises = _row_noise(jax.random.key(seed), jnp.asarray(ids, jnp.uint32), steps,
                                             image_latents.shape[1:])
        latents = row_latents if latents is None else latents
        noises = row_noises if noises is None else noises
        if self.style:
            style = jnp.asarray(style_images, jnp.float32)
            if style.shape != images.shape:
                style = jax.image.resize(style, images.shape, "linear")
            cond = guidance.SpecialistCond(image_latents, self.encode_images(style), text_emb, uncond,
                                           1.0, guidance_text, guidance_image, guidance_style)
        else:
            cond = guidance.IP2PCond(image_latents, text_emb, uncond, guidance_text, guidance_image)
        z0 = sampling.sample(self.denoise, self.denoiser_params, cond, self.schedule, jnp.asarray(latents),
                             jax.random.key(seed), steps=steps, sampler=sampler, eta=eta, noises=jnp.asarray(noises))
        return self.decode(z0)

    def edit(self, images, instructions: str | Sequence[str], style_images=None, *, steps: int = 20,
             sampler: str = "euler_ancestral", guidance_text: float = 7.5, guidance_image: float = 1.5,
             guidance_style: float = 3.0, resolution: int | None = None, seed: int = 0, batch_size: int = 4,
             image_ids: Sequence[int] | None = None,
             progress: Callable[[int], None] | None = None) -> list[Image.Image]:
        """Edits PIL images / uint8 arrays; returns PIL images.

        `instructions`: one for all images or one per image; `style_images`: one per image or one
        for all (Specialists models). `resolution` resizes the shorter side first (multiples of 8
        kept). Images are processed `batch_size` at a time. Image i's noise depends only on
        (seed, image_ids[i]) (default: its position), not on batching.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        images = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, np.uint8) for im in images]
        n = len(images)
        instructions = [instructions] * n if isinstance(instructions, str) else list(instructions)
        if len(instructions) != n:
            raise ValueError(f"{len(instructions)} instructions for {n} images")
        if any(not s.strip() for s in instructions):
            raise ValueError("empty instruction")
        styles = None
        if style_images is not None:
            styles = [np.asarray(s.convert("RGB") if isinstance(s, Image.Image) else s, np.uint8) for s in style_images]
            if len(styles) == 1:
                styles = styles * n
            if len(styles) != n:
                raise ValueError(f"{len(styles)} style images for {n} images: give one, or one per image")
        ids = list(range(n)) if image_ids is None else list(image_ids)
        f = self.vae_scale_factor
        out: list[Image.Image] = []
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            shapes = {imio.resize_to_multiple(images[i], f, resolution).shape for i in idx}
            groups = [[i for i in idx if imio.resize_to_multiple(images[i], f, resolution).shape == s] for s in shapes]
            results = {}
            for group in groups:  # images of one size share a batch
                batch = np.stack([imio.resize_to_multiple(images[i], f, resolution) for i in group])
                sty = None
                if styles is not None:
                    sty = np.stack([np.asarray(Image.fromarray(styles[i]).resize(batch.shape[2:0:-1], Image.LANCZOS))
                                    for i in group])
                    sty = imio.to_model(sty)
                edited = self.edit_arrays(imio.to_model(batch), [instructions[i] for i in group], sty, steps=steps,
                                          sampler=sampler, guidance_text=guidance_text, guidance_image=guidance_image,
                                          guidance_style=guidance_style, seed=seed,
                                          image_ids=[ids[i] for i in group])
                for i, arr in zip(group, imio.from_model(edited)):
                    results[i] = Image.fromarray(arr)
            out += [results[i] for i in idx]
            if progress:
                progress(len(idx))
        return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _row_noise(key, ids, steps: int, latent_shape: tuple) -> tuple[jax.Array, jax.Array]:
    """Per-image noise: initial latents (B,h,w,c) and step noise (steps,B,h,w,c) from fold_in(key, id)."""
    def one(i):
        k = jax.random.fold_in(key, i)
        return (jax.random.normal(jax.random.fold_in(k, 0), latent_shape),
                jax.random.normal(jax.random.fold_in(k, 1), (steps, *latent_shape)))
    latents, noises = jax.vmap(one)(ids)
    return latents, jnp.swapaxes(noises, 0, 1)
