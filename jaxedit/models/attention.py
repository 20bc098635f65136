"""Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

#: Flax collection that receives head-averaged cross-attention probabilities when it is mutable.
ATTENTION_PROBS = "attention_probs"


#: On CPU, attention whose per-head logits have at least this many entries is computed one
#: head (and one block of queries) at a time, so that the logits stay in cache.
CPU_BLOCK_LOGITS = 1 << 18


def attention(q, k, v, *, upcast: bool = False):
    """Scaled dot-product attention. q (B,N,H,D), k/v (B,M,H,D) -> (B,N,H,D).

    Uses `jax.nn.dot_product_attention` (cuDNN / TPU kernels when available) on accelerators and
    `_attention_cpu` on CPU (same math, ~3x faster there). `upcast` computes in fp32 (diffusers'
    ``upcast_attention`` / ``upcast_softmax``) and casts back.
    """
    dtype = q.dtype
    if upcast and dtype != jnp.float32:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if jax.default_backend() == "cpu":
        return _attention_cpu(q, k, v).astype(dtype)
    return jax.nn.dot_product_attention(q, k, v).astype(dtype)


def _softmax_attend(q, k, v):
    """softmax(q k^T) v over the last two axes, q (..., n, d), k/v (..., m, d); q is pre-scaled.

    Logits and softmax statistics in fp32; the normalisation divides the (n, d) output rather
    than the (n, m) probabilities.
    """
    logits = jnp.einsum("...nd,...md->...nm", q, k, preferred_element_type=jnp.float32)
    e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    out = jnp.einsum("...nm,...md->...nd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / e.sum(axis=-1, keepdims=True)


def _attention_cpu(q, k, v):
    """`jax.nn.dot_product_attention`'s math laid out for XLA:CPU.

    Heads go first ((B*H, N, D) matmuls); the 1/sqrt(D) scale is applied to q, not to the
    logits; large attention (self-attention over >= 512 tokens) loops over heads and query
    blocks with `lax.map` so that no (B, H, N, M) logits tensor is ever materialised.
    """
    b, n, h, d = q.shape
    m = k.shape[1]
    q = q * jnp.asarray(d ** -0.5, q.dtype)
    heads_first = lambda a: a.transpose(0, 2, 1, 3).reshape(b * h, a.shape[1], d)
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    if n * m < CPU_BLOCK_LOGITS:
        out = _softmax_attend(qh, kh, vh)
    else:
        block = n  # largest divisor of n whose logits block fits CPU_BLOCK_LOGITS
        while block * m > CPU_BLOCK_LOGITS and block % 2 == 0:
            block //= 2

        def one_head(args):
            qi, ki, vi = args
            if block == n:
                return _softmax_attend(qi, ki, vi)
            blocks = jax.lax.map(lambda qb: _softmax_attend(qb, ki, vi), qi.reshape(n // block, block, d))
            return blocks.reshape(n, d)

        out = jax.lax.map(one_head, (qh, kh, vh))
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def attention_probs(q, k):
    """Softmax attention probabilities in fp32, q (B,N,H,D), k (B,M,H,D) -> (B,H,N,M)."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q.astype(jnp.float32), k.astype(jnp.float32))
    return jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)


class Attention(nn.Module):
    """diffusers ``Attention``: x (B,N,query_dim), context (B,M,Dc) or None -> (B,N,query_dim).

    When the ``attention_probs`` collection is mutable and this is cross-attention, the
    head-averaged probabilities (B,N,M) (fp32) are also computed and sown under ``probs``; the
    output is the same either way, and nothing extra is computed otherwise.
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
            self.sow(ATTENTION_PROBS, "probs", attention_probs(q, k).mean(axis=1))
        out = attention(q, k, v, upcast=self.upcast)  # recording leaves the output bit-identical
        out = out.reshape(out.shape[:-2] + (inner,))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)
