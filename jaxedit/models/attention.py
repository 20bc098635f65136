"""Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

#: Flax collection that receives head-averaged cross-attention probabilities when it is mutable.
ATTENTION_PROBS = "attention_probs"


def attention(q, k, v, *, upcast: bool = False):
    """Scaled dot-product attention. q (B,N,H,D), k/v (B,M,H,D) -> (B,N,H,D).

    Uses `jax.nn.dot_product_attention` (cuDNN / TPU kernels when available). `upcast` computes
    in fp32 (diffusers' ``upcast_attention`` / ``upcast_softmax``) and casts back.
    """
    dtype = q.dtype
    if upcast and dtype != jnp.float32:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v).astype(dtype)


def attention_probs(q, k):
    """Softmax attention probabilities in fp32, q (B,N,H,D), k (B,M,H,D) -> (B,H,N,M)."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q.astype(jnp.float32), k.astype(jnp.float32))
    return jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)


class Attention(nn.Module):
    """diffusers ``Attention``: x (B,N,query_dim), context (B,M,Dc) or None -> (B,N,query_dim).

    When the ``attention_probs`` collection is mutable and this is cross-attention, the
    head-averaged probabilities (B,N,M) are sown under ``probs``; otherwise nothing extra is
    computed.
    """
    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        inner = self.heads * self.dim_head
        ctx = x if context is None else context
        dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)
        split = lambda a: a.reshape(a.shape[:-1] + (self.heads, self.dim_head))
        q = split(dense("to_q", self.qkv_bias)(x))
        k = split(dense("to_k", self.qkv_bias)(ctx))
        v = split(dense("to_v", self.qkv_bias)(ctx))
        if context is not None and self.is_mutable_collection(ATTENTION_PROBS):
            probs = attention_probs(q, k)
            self.sow(ATTENTION_PROBS, "probs", probs.mean(axis=1))
            out = jnp.einsum("bhnm,bmhd->bnhd", probs, v.astype(jnp.float32)).astype(q.dtype)
        else:
            out = attention(q, k, v, upcast=self.upcast)
        out = out.reshape(out.shape[:-2] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)
