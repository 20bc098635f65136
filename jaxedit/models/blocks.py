"""Convolutional building blocks shared by the U-Net and the VAE (NHWC, diffusers names)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm over NHWC with exact (two-pass) variance, statistics in fp32."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, padding: int | None = None):
    """Square NHWC conv with ``kernel`` (k,k,Cin,features) and ``bias`` params, like `nn.Conv`."""
    pad = kernel // 2 if padding is None else padding
    return Conv2D(features, kernel, stride, pad, dtype=dtype, name=name)


#: On CPU, convs with at most this many output pixels per image are computed as one matmul
#: over explicit patches (im2col): for these XLA:CPU's convolution is 1.5-4x slower than the
#: matmul (SD U-Net's 8x8 and 4x4 levels); for larger images the direct convolution wins.
IM2COL_MAX_PIXELS = 64


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """NHWC x HWIO convolution, symmetric zero padding (im2col + matmul for small outputs on CPU)."""
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    if kh * kw > 1 and ho * wo <= IM2COL_MAX_PIXELS and jax.default_backend() == "cpu":
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        taps = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
                for i in range(kh) for j in range(kw)]
        patches = jnp.concatenate(taps, axis=-1).reshape(b * ho * wo, kh * kw * c)
        return (patches @ kernel.reshape(kh * kw * c, o)).reshape(b, ho, wo, o)
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2D(nn.Module):
    """`nn.Conv` (same params, initialisers and dtype promotion) for square kernels, NHWC."""
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(x, kernel, self.stride, self.padding) + bias


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (time_embedding_norm="default"): (B,H,W,Cin) -> (B,H,W,out)."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv named ``conv``. padding=0 pads right/bottom by one first (VAE encoder)."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling as torch ``F.interpolate(mode="nearest")``; 2x by default."""
    b, h, w, c = x.shape
    oh, ow = size or (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest 2x (or to `size`) then 3x3 conv named ``conv``."""
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: tuple[int, int] | None = None):
        return conv(self.out_channels, 3, self.dtype, "conv")(upsample_nearest(x, size))
