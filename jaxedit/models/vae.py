"""Flax port of diffusers' ``AutoencoderKL`` (the SD 1.x VAE), NHWC throughout.

Parameter names mirror diffusers (``encoder.down_blocks.0.resnets.1.conv1`` ->
``params["encoder"]["down_blocks_0"]["resnets_1"]["conv1"]``), so checkpoints convert 1:1.

The latent scaling factor is *not* applied here: callers multiply ``encode(x).mode()`` (or a
sample) by ``config.scaling_factor`` before diffusion and divide by it before ``decode``.
With n = len(block_out_channels), the spatial downsampling factor is 2**(n-1) (8 for SD).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxedit.models.attention import Attention
from jaxedit.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm
from jaxedit.models.state_dict import CheckpointError

Dtype = Any
EPS = 1e-6  # every VAE norm (resnets, attention, conv_norm_out)

# diffusers config keys that jaxedit implements only at these values.
_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# Where diffusers' AutoencoderKL defaults differ from SD 1.x (`Config()`): used for missing keys.
_DIFFUSERS_DEFAULTS = {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
                       "block_out_channels": (64,), "layers_per_block": 1, "sample_size": 32}


@dataclasses.dataclass(frozen=True)
class Config:
    """The diffusers ``AutoencoderKL`` config fields SD 1.x uses; ``Config()`` is the SD 1.x VAE.

    `force_upcast`, `sample_size` and `shift_factor` are kept for round-tripping and for
    callers; they do not change what this module computes.
    """
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a diffusers ``vae/config.json`` dict; errors name the unsupported field.

        Missing keys take diffusers' ``AutoencoderKL`` defaults (as ``from_pretrained`` would).
        """
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        for key, want in _FIXED.items():
            got = d.pop(key, want)
            if got != want:
                raise CheckpointError(f"VAE config: {key}={got!r} is not supported "
                                      f"(jaxedit implements {key}={want!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise CheckpointError(f"VAE config: unknown field(s) {unknown}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in {**_DIFFUSERS_DEFAULTS, **d}.items()}
        n = len(kwargs["block_out_channels"])
        for key, ok in _BLOCKS.items():
            types = kwargs[key]
            bad = [t for t in types if t != ok]
            if bad:
                raise CheckpointError(f"VAE config: {key} contains unsupported block type {bad[0]!r} "
                                      f"(jaxedit implements only {ok!r})")
            if len(types) != n:
                raise CheckpointError(f"VAE config: {key} has {len(types)} entries for "
                                      f"{n} block_out_channels")
        if not isinstance(kwargs["layers_per_block"], int):
            raise CheckpointError("VAE config: layers_per_block must be a single int")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """diffusers-compatible ``config.json`` content."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
                "latents_mean": None, "latents_std": None, **d}


@struct.dataclass
class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)); mean/logvar (B,h,w,latent), logvar clipped to [-30, 20]."""
    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std · ε with ε ~ N(0, I) drawn from `key`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class MidAttention(nn.Module):
    """diffusers VAE mid-block ``Attention``: group_norm, 1 head of width C, residual.

    x (B,H,W,C) -> (B,H,W,C). ``group_norm``, ``to_q/k/v`` and ``to_out_0`` share one scope.
    """
    channels: int
    groups: int
    dtype: Dtype = jnp.float32

    def setup(self):
        self.attn = Attention(heads=1, dim_head=self.channels, qkv_bias=True, upcast=True, dtype=self.dtype)
        nn.share_scope(self, self.attn)

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(self.groups, EPS, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        return x + self.attn(y).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, [attention], resnet. (B,H,W,C) -> same."""
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, EPS, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = MidAttention(c, self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, EPS, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (optionally) a stride-2 conv: (B,H,W,Cin) -> (B,H/2,W/2,C)."""
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:  # diffusers' VAE encoder pads right/bottom then convolves unpadded
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then (optionally) nearest 2x + conv: (B,H,W,Cin) -> (B,2H,2W,C)."""
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """x (B,H,W,in_channels) -> moments (B,H/f,W/f,2·latent), f = 2**(n_blocks-1)."""
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dtype, g = self.config, self.dtype, self.config.norm_num_groups
        chans = cfg.block_out_channels
        x = conv(chans[0], 3, dtype, "conv_in")(x)
        for i, ch in enumerate(chans):
            x = DownEncoderBlock2D(ch, cfg.layers_per_block, g, i < len(chans) - 1, dtype,
                                   name=f"down_blocks_{i}")(x)
        x = MidBlock(g, cfg.mid_block_add_attention, dtype, name="mid_block")(x)
        x = nn.silu(group_norm(g, EPS, dtype, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, dtype, "conv_out")(x)


class Decoder(nn.Module):
    """z (B,h,w,latent) -> image (B,f·h,f·w,out_channels), f = 2**(n_blocks-1)."""
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dtype, g = self.config, self.dtype, self.config.norm_num_groups
        chans = tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, dtype, "conv_in")(z)
        x = MidBlock(g, cfg.mid_block_add_attention, dtype, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, g, i < len(chans) - 1, dtype,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(g, EPS, dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``. `dtype` is the compute dtype (params stay as given, fp32).

    Use ``module.apply({"params": p}, x, method="encode")`` / ``method="decode"``. Latents are
    unscaled: multiply by ``config.scaling_factor`` for the diffusion model.
    """
    config: Config
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x (B,H,W,in_channels) in [-1, 1] -> posterior with mean/logvar (B,H/f,W/f,latent)."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B,h,w,latent), unscaled -> image (B,f·h,f·w,out_channels), roughly in [-1, 1]."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction decode(encode(x).mode()); (B,H,W,C) -> (B,H,W,out_channels)."""
        return self.decode(self.encode(x).mode())

    def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Smallest input for `init`: (batch, f, f, in_channels) with f the downsampling factor."""
        f = 2 ** (len(self.config.block_out_channels) - 1)
        return (jnp.zeros((batch, f, f, self.config.in_channels), jnp.float32),)


def build(config: Config, dtype: Dtype = jnp.float32) -> AutoencoderKL:
    return AutoencoderKL(config, dtype=dtype)


_LEGACY = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")
_RENAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def fix_torch_keys(state: dict) -> dict:
    """Renames legacy VAE attention tensors (``query/key/value/proj_attn`` -> ``to_q/to_k/to_v/
    to_out.0``, as diffusers does on load) and squeezes attention weights stored as 1x1 convs
    (O,I,1,1) to linear (O,I). Other keys pass through unchanged."""
    out = {}
    for key, value in state.items():
        m = _LEGACY.match(key)
        if m:
            prefix, name, leaf = m.groups()
            key = f"{prefix}.{_RENAME.get(name, name)}.{leaf}"
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        out[key] = value
    return out
