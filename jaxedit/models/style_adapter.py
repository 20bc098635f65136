"""Image-Editing Specialists' style adapter and the 12-channel style-conditioned U-Net.

The adapter (paper Sec. 3.3) is a cross-attention layer whose queries are a linear projection of
the concatenated VAE latents ``[E(I_in), E(I_sty)]`` at every latent pixel and whose keys/values
are projections of the CLIP text states of the instruction. Its 4-channel output, at the latent's
spatial size, is the third 4-channel block of the U-Net input: ``[z_t, E(I_in), adapter]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.models.attention import Attention
from jaxedit.models.state_dict import CheckpointError
from jaxedit.models.unet import Config as UNetConfig
from jaxedit.models.unet import UNet2DConditionModel

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Adapter sizes: `dim` attention width, `heads` heads, `latent_channels` per latent (4)."""
    dim: int = 320
    heads: int = 8
    latent_channels: int = 4
    cross_attention_dim: int = 768

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CheckpointError(f"style adapter config: unknown field(s) {sorted(unknown)}")
        if d.get("dim", cls.dim) % d.get("heads", cls.heads):
            raise CheckpointError("style adapter config: dim must be a multiple of heads")
        return cls(**d)

    def to_dict(self) -> dict:
        return {"_class_name": "StyleAdapter", **dataclasses.asdict(self)}


class StyleAdapter(nn.Module):
    """(image_latent (B,h,w,c), style_latent (B,h,w,c), context (B,L,D)) -> (B,h,w,c).

    ``proj_in`` (2c -> dim) per latent pixel, multi-head cross-attention to the text states
    (``attn``: to_q/to_k/to_v/to_out.0), ``proj_out`` (dim -> c).
    """
    config: Config
    dtype: Dtype = jnp.float32

    def dummy_inputs(self):
        c = self.config.latent_channels
        z = jnp.zeros((1, 2, 2, c), jnp.float32)
        return z, z, jnp.zeros((1, 1, self.config.cross_attention_dim), jnp.float32)

    @nn.compact
    def __call__(self, image_latent, style_latent, context):
        cfg = self.config
        b, h, w, c = image_latent.shape
        x = jnp.concatenate([image_latent, style_latent], axis=-1).astype(self.dtype).reshape(b, h * w, 2 * c)
        x = nn.Dense(cfg.dim, dtype=self.dtype, name="proj_in")(x)
        x = Attention(cfg.heads, cfg.dim // cfg.heads, dtype=self.dtype, name="attn")(x, context.astype(self.dtype))
        return nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)


class StyleConditionedUNet(nn.Module):
    """The Specialists denoiser: params ``{"unet": ..., "style_adapter": ...}``.

    __call__(z_t (B,h,w,4), image_latent (B,h,w,4), style_latent (B,h,w,4), timesteps (B,),
    context (B,L,D), style_keep (B,) or None) -> eps (B,h,w,4) fp32. ``style_keep = 0`` drops the
    style for that row (its adapter channels are zero, like a dropped image's zero latent).
    """
    unet_config: UNetConfig
    adapter_config: Config
    dtype: Dtype = jnp.float32
    remat: bool | str = False               # the U-Net's per-block remat policy (`unet.REMAT_POLICIES`)

    def dummy_inputs(self):
        size = 2 ** (len(self.unet_config.block_out_channels) - 1)
        z = jnp.zeros((1, size, size, self.adapter_config.latent_channels), jnp.float32)
        return z, z, z, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, self.unet_config.cross_attention_dim[0]))

    @nn.compact
    def __call__(self, z_t, image_latent, style_latent, timesteps, context, style_keep=None):
        a = StyleAdapter(self.adapter_config, self.dtype, name="style_adapter")(image_latent, style_latent, context)
        if style_keep is not None:
            a = a * jnp.asarray(style_keep, a.dtype)[:, None, None, None]
        x = jnp.concatenate([z_t.astype(a.dtype), image_latent.astype(a.dtype), a], axis=-1)
        return UNet2DConditionModel(self.unet_config, self.dtype, self.remat, name="unet")(x, timesteps, context)


def from_instruct_pix2pix(unet_config: UNetConfig, unet_params: dict, adapter_config: Config | None = None,
                          *, key: jax.Array, dtype: Dtype = jnp.float32) -> tuple[StyleConditionedUNet, dict]:
    """A 12-channel Specialists model from an 8-channel InstructPix2Pix U-Net.

    ``conv_in`` gains 4 zero-initialised input channels and the adapter is freshly initialised,
    so the result computes exactly what the 8-channel model did.
    """
    from jaxedit.models.load import expand_conv_in  # load imports this module's siblings

    if unet_config.in_channels != 8:
        raise ValueError(f"expected an 8-channel InstructPix2Pix U-Net, got in_channels={unet_config.in_channels}")
    adapter_config = adapter_config or Config(cross_attention_dim=unet_config.cross_attention_dim[0])
    module = StyleConditionedUNet(dataclasses.replace(unet_config, in_channels=12), adapter_config, dtype)
    adapter = StyleAdapter(adapter_config)
    adapter_params = jax.jit(adapter.init)(key, *adapter.dummy_inputs())["params"]
    return module, {"unet": expand_conv_in(unet_params, 12), "style_adapter": adapter_params}


def build(config: Config, dtype: Dtype = jnp.float32) -> StyleAdapter:
    return StyleAdapter(config, dtype)


def fix_torch_keys(state: dict) -> dict:
    return state
