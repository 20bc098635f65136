"""Flax port of diffusers' ``UNet2DConditionModel`` as used by SD 1.x and InstructPix2Pix.

NHWC throughout. Parameter names mirror diffusers (``down_blocks.0.attentions.1.proj_in`` ->
``params["down_blocks_0"]["attentions_1"]["proj_in"]``), so checkpoints convert 1:1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.models.attention import Attention
from jaxedit.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm
from jaxedit.models.state_dict import CheckpointError

Dtype = Any
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)

# diffusers config keys that jaxedit implements only at these values.
_FIXED = {
    "act_fn": "silu", "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "projection_class_embeddings_input_dim": None,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "addition_embed_type_num_heads": 64,
}
# Accepted and without effect on the computation here.
_IGNORED = {"sample_size", "dropout", "mid_block_only_cross_attention"}


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CheckpointError(f"U-Net config: {name} has {len(value)} entries for {n} down blocks")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class Config:
    """The subset of diffusers' ``UNet2DConditionModel`` config that SD 1.x uses.

    Defaults are SD 1.5's U-Net. Per-block fields are normalised to tuples on construction.
    """
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Per-block values (one value = the same for every block).
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    num_attention_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int | tuple[int, ...] = 768
    only_cross_attention: bool | tuple[bool, ...] = False
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int | None = 64

    _PER_BLOCK = ("layers_per_block", "transformer_layers_per_block", "num_attention_heads",
                  "cross_attention_dim", "only_cross_attention")

    def __post_init__(self):
        """Per-block fields may be given as one value for all blocks; stored as tuples."""
        n = len(self.down_block_types)
        for name in ("up_block_types", "block_out_channels"):
            if len(getattr(self, name)) != n:
                raise CheckpointError(f"U-Net config: {name} has {len(getattr(self, name))} entries "
                                      f"for {n} down blocks")
        for name in self._PER_BLOCK:
            object.__setattr__(self, name, _per_block(getattr(self, name), n, name))
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a diffusers ``unet/config.json`` dict; errors name unsupported fields."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        for key, want in _FIXED.items():
            got = d.pop(key, want)
            if got != want:
                raise CheckpointError(f"U-Net config: {key}={got!r} is not supported "
                                      f"(jaxedit implements {key}={want!r})")
        down = tuple(d.pop("down_block_types", cls.down_block_types))
        up = tuple(d.pop("up_block_types", cls.up_block_types))
        for kind, types, ok in (("down", down, DOWN_BLOCKS), ("up", up, UP_BLOCKS)):
            bad = [t for t in types if t not in ok]
            if bad:
                raise CheckpointError(f"U-Net config: unsupported {kind} block type {bad[0]!r} "
                                      f"(supported: {', '.join(ok)})")
        mid = d.pop("mid_block_type", cls.mid_block_type)
        if mid is not None and mid not in MID_BLOCKS:
            raise CheckpointError(f"U-Net config: unsupported mid block type {mid!r} (supported: {MID_BLOCKS[0]})")
        # SD-1 configs call the number of heads `attention_head_dim` (legacy naming).
        heads = d.pop("num_attention_heads", None)
        head_dim = d.pop("attention_head_dim", 8)
        # Missing keys mean diffusers' defaults, as they do for diffusers.
        kwargs = dict(down_block_types=down, up_block_types=up, mid_block_type=mid,
                      num_attention_heads=heads if heads is not None else head_dim,
                      layers_per_block=d.pop("layers_per_block", 2),
                      cross_attention_dim=d.pop("cross_attention_dim", 1280))
        tlpb = d.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in tlpb):
            raise CheckpointError("U-Net config: nested transformer_layers_per_block is not supported")
        if d.get("norm_num_groups", 32) is None:
            raise CheckpointError("U-Net config: norm_num_groups=None is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in list(d):
            if key in fields:
                kwargs[key] = d.pop(key)
            elif key in _IGNORED:
                d.pop(key)
        if d:
            raise CheckpointError(f"U-Net config: unknown field(s) {sorted(d)}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """diffusers-compatible ``config.json`` content."""
        d = dataclasses.asdict(self)
        d["attention_head_dim"] = list(d.pop("num_attention_heads"))  # SD-1 legacy name
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
                "act_fn": "silu", **d}


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim), as diffusers' ``Timesteps``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GEGLU(nn.Module):
    """``proj`` to 2·inner, then value · gelu(gate) (exact gelu)."""
    inner: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net.0.proj`` then ``net.2``; (..., D) -> (..., D)."""
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(GEGLU(4 * dim, self.dtype, name="net_0")(x))


class BasicTransformerBlock(nn.Module):
    """Self-attention (or cross-only), cross-attention, feed-forward; x (B,N,D), context (B,M,Dc)."""
    heads: int
    dim_head: int
    only_cross_attention: bool
    upcast: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x, context):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, upcast=self.upcast, dtype=self.dtype, name=name)
        x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in`` (1x1 conv or linear), transformer blocks, ``proj_out``, residual.

    x (B,H,W,C), context (B,M,Dc) -> (B,H,W,C).
    """
    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool
    upcast: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        proj = (lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.use_linear_projection else (
            lambda name: conv(c, 1, self.dtype, name))
        y = proj("proj_in")(group_norm(self.groups, 1e-6, self.dtype, "norm")(x)).reshape(b, h * w, c)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(self.heads, c // self.heads, self.only_cross_attention, self.upcast,
                                      self.dtype, name=f"transformer_blocks_{i}")(y, context)
        return proj("proj_out")(y.reshape(b, h, w, c)) + x


class UNetBlock(nn.Module):
    """One down or up block (with or without cross-attention), diffusers names.

    Down: x -> (x', skips) where skips are the outputs after each layer and the downsampler.
    Up:   (x, skips) -> x', consuming skips from the end; `upsample_size` forces the output size.
    """
    out_channels: int
    num_layers: int
    attention: bool = False
    resample: bool = False  # add a down/up sampler
    up: bool = False
    heads: int = 8
    transformer_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast: bool = False
    downsample_padding: int = 1
    upsample_size: tuple[int, int] | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, skips=()):
        skips, outputs = list(skips), []
        for i in range(self.num_layers):
            if self.up:
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.attention:
                x = Transformer2DModel(self.heads, self.transformer_layers, self.groups, self.use_linear_projection,
                                       self.only_cross_attention, self.upcast, self.dtype,
                                       name=f"attentions_{i}")(x, context)
            outputs.append(x)
        if self.resample and self.up:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, self.upsample_size)
        elif self.resample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            outputs.append(x)
        return x if self.up else (x, tuple(outputs))


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, (transformer, resnet) x n; (B,h,w,C) -> (B,h,w,C)."""
    heads: int
    transformer_layers: int
    groups: int
    eps: float
    output_scale_factor: float
    use_linear_projection: bool
    upcast: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x, temb, context):
        c = x.shape[-1]
        res = lambda i: ResnetBlock2D(c, self.groups, self.eps, self.output_scale_factor, self.dtype, name=f"resnets_{i}")
        x = res(0)(x, temb)
        x = Transformer2DModel(self.heads, self.transformer_layers, self.groups, self.use_linear_projection,
                               False, self.upcast, self.dtype, name="attentions_0")(x, context)
        return res(1)(x, temb)


#: Per-block rematerialisation (``remat``): what the backward pass keeps of each block's forward.
#: "full" keeps only the block inputs (recomputes everything), "dots" keeps the matmul outputs
#: (attention and linear layers) and recomputes convolutions, norms and activations.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_saveable}


def remat_policy(remat: bool | str) -> str:
    """``remat`` (a policy name, or False / True = "none" / "full") -> the policy name."""
    name = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    return name


class UNet2DConditionModel(nn.Module):
    """The denoiser: (sample (B,h,w,in_channels), timesteps (B,) or (), context (B,M,Dc)) -> eps (B,h,w,out).

    `dtype` is the compute dtype (params stay fp32); the output is fp32. `remat` rematerialises each
    block in the backward pass (a `REMAT_POLICIES` name, or a bool). Cross-attention probabilities are sown in the ``attention_probs``
    collection when the caller makes it mutable.
    """
    config: Config
    dtype: Dtype = jnp.float32
    remat: bool | str = False

    def dummy_inputs(self, batch: int = 1, size: int | None = None):
        cfg = self.config
        size = size or 2 ** (len(cfg.block_out_channels) - 1)
        return (jnp.zeros((batch, size, size, cfg.in_channels), jnp.float32), jnp.zeros((batch,), jnp.int32),
                jnp.zeros((batch, 1, cfg.cross_attention_dim[0]), jnp.float32))

    @nn.compact
    def __call__(self, sample, timesteps, context):
        cfg, dtype = self.config, self.dtype
        n = len(cfg.block_out_channels)
        policy = remat_policy(self.remat)
        block = UNetBlock if policy == "none" else nn.remat(UNetBlock, policy=REMAT_POLICIES[policy])
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, use_linear_projection=cfg.use_linear_projection,
                      upcast=cfg.upcast_attention, dtype=dtype)
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        c0 = cfg.block_out_channels[0]
        t = timestep_embedding(timesteps, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype)
        temb = TimestepEmbedding(4 * c0, dtype, name="time_embedding")(t)

        x = sample.astype(dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        context = context.astype(dtype)
        x = conv(c0, cfg.conv_in_kernel, dtype, "conv_in")(x)
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, out = block(cfg.block_out_channels[i], cfg.layers_per_block[i], attention=kind.startswith("CrossAttn"),
                           resample=i < n - 1, heads=cfg.num_attention_heads[i],
                           transformer_layers=cfg.transformer_layers_per_block[i],
                           only_cross_attention=cfg.only_cross_attention[i],
                           downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}", **common)(x, temb, context)
            skips += out
        if cfg.mid_block_type is not None:
            x = UNetMidBlock2DCrossAttn(cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                                        cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor,
                                        cfg.use_linear_projection, cfg.upcast_attention, dtype,
                                        name="mid_block")(x, temb, context)
        rev = lambda seq: tuple(reversed(seq))
        for i, kind in enumerate(cfg.up_block_types):
            k = n - 1 - i  # matching down block
            layers = rev(cfg.layers_per_block)[i] + 1
            block_skips, skips = skips[-layers:], skips[:-layers]
            last = i == n - 1
            x = block(cfg.block_out_channels[k], layers, attention=kind.startswith("CrossAttn"), resample=not last,
                      up=True, heads=cfg.num_attention_heads[k], transformer_layers=cfg.transformer_layers_per_block[k],
                      only_cross_attention=cfg.only_cross_attention[k],
                      upsample_size=None if last else tuple(skips[-1].shape[1:3]),
                      name=f"up_blocks_{i}", **common)(x, temb, context, tuple(block_skips))
        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(x))
        x = conv(cfg.out_channels, cfg.conv_out_kernel, dtype, "conv_out")(x)
        return x.astype(jnp.float32)


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2``: (B, C0) -> (B, features)."""
    features: int
    dtype: Dtype

    @nn.compact
    def __call__(self, t):
        h = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(t))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(h)


def build(config: Config, dtype: Dtype = jnp.float32, remat: bool | str = False) -> UNet2DConditionModel:
    return UNet2DConditionModel(config, dtype=dtype, remat=remat)


def fix_torch_keys(state: dict) -> dict:
    """diffusers U-Net checkpoints need no renaming."""
    return state
