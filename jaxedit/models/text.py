"""Flax port of transformers' ``CLIPTextModel`` (the SD 1.x text encoder) and its tokenizer.

Parameter names mirror the torch checkpoint: ``text_model.encoder.layers.0.self_attn.q_proj`` ->
``params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]``, so weights convert 1:1
(see convert.py). Tokenizers come from transformers (imported lazily; this module never imports
torch).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.models.state_dict import CheckpointError

Dtype = Any
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP / SD 1.x
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# transformers config keys that cannot change what CLIPTextModel computes.
_IGNORED = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
    "initializer_factor", "attention_dropout", "dropout", "output_attentions", "output_hidden_states",
    "return_dict", "use_return_dict", "torchscript", "use_bfloat16", "tie_word_embeddings",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id", "num_labels",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "sep_token_id", "decoder_start_token_id", "gradient_checkpointing", "use_cache",
    # generation settings saved by transformers 4.x
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
# Tensors of CLIPModel / CLIPTextModelWithProjection checkpoints that this encoder does not use.
_UNUSED_PREFIXES = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


@dataclasses.dataclass(frozen=True)
class Config:
    """transformers ``CLIPTextConfig`` fields (defaults are transformers' defaults)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    pad_token_id: int | None = 1

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """From a ``CLIPTextModel`` config.json (or a ``CLIPModel`` one: its ``text_config``)."""
        if d.get("model_type") == "clip" or "text_config" in d or "text_config_dict" in d:
            d = d.get("text_config") or d.get("text_config_dict") or {}
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise CheckpointError(f"text encoder config: model_type {d['model_type']!r} is not "
                                  "'clip_text_model'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in d.items():
            if key in fields:
                kw[key] = value
            elif key.startswith("_") or key in _IGNORED or (key == "pruned_heads" and not value):
                continue
            else:
                raise CheckpointError(f"text encoder config: unsupported field {key!r} = {value!r}")
        config = cls(**kw)
        if config.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"text encoder config: unsupported hidden_act {config.hidden_act!r} "
                                  f"(supported: {sorted(ACTIVATIONS)})")
        if not isinstance(config.eos_token_id, int):
            raise CheckpointError(f"text encoder config: eos_token_id must be one integer, "
                                  f"got {config.eos_token_id!r}")
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"text encoder config: hidden_size {config.hidden_size} is not a "
                                  f"multiple of num_attention_heads {config.num_attention_heads}")
        return config

    def to_dict(self) -> dict:
        """config.json contents loadable by ``transformers.CLIPTextModel.from_pretrained``."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                **dataclasses.asdict(self)}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: (B, L, D) -> (B, L, D)."""
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        b, n, d = x.shape
        heads = c.num_attention_heads
        q, k, v = (nn.Dense(d, dtype=self.dtype, name=name)(x).reshape(b, n, heads, d // heads)
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(b, n, d))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: (B, L, D) -> (B, L, D)."""
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(h)


def _layer_norm(config: Config, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: (B, L, D) -> (B, L, D)."""
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(
            _layer_norm(self.config, self.dtype, "layer_norm1")(x))
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(
            _layer_norm(self.config, self.dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    """Token + learned position embeddings: int (B, L) -> (B, L, D)."""
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                       name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tok + pos[None]


class CLIPTextTransformer(nn.Module):
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        x = CLIPEncoder(c, self.dtype, name="encoder")(x)
        x = _layer_norm(c, self.dtype, "final_layer_norm")(x)
        if c.eos_token_id == 2:  # transformers' legacy rule: the highest id is the EOS token
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # first EOS (the pad token may also be EOS)
            eos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        return x, jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel``; compute in `dtype`, params fp32.

    ``__call__(input_ids)``: int32 (B, L), L <= max_position_embeddings ->
    ``(last_hidden_state (B, L, D), pooled (B, D))``, pooled = final-normed state at the EOS token.
    """
    config: Config
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids must be (B, L<={self.config.max_position_embeddings}), "
                             f"got {input_ids.shape}")
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(input_ids)

    def dummy_inputs(self) -> tuple[jax.Array]:
        return (jnp.zeros((1, self.config.max_position_embeddings), jnp.int32),)


def build(config: Config, dtype: Dtype = jnp.float32) -> CLIPTextModel:
    return CLIPTextModel(config, dtype=dtype)


def fix_torch_keys(state: dict) -> dict:
    """Adds the ``text_model.`` prefix (transformers 5 saves without it) and drops buffers
    (``position_ids``) and CLIPModel / projection tensors this encoder does not use."""
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        short = key[len("text_model."):]
        if short.endswith("position_ids") or short.startswith(_UNUSED_PREFIXES):
            continue
        out[key] = value
    return out


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(folder: str):
    """A transformers ``CLIPTokenizer`` from a local folder (vocab.json + merges.txt or tokenizer.json)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    files = set(os.listdir(folder))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.json + "
                              f"merges.txt; folder holds {sorted(files)[:10]}")
    from transformers import CLIPTokenizer
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {type(e).__name__}: {e}") from e


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int) -> np.ndarray:
    """Texts -> int32 (B, max_length) ids: BOS, tokens, EOS, then pad tokens; truncated to keep
    the EOS last (SD 1.x convention, max_length = 77)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length).input_ids
    return np.asarray(ids, np.int32)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: the 256 characters standing for bytes 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


TINY_WORDS = (
    "make it the a an of to in into with and add remove replace change turn put give "
    "snow snowy rain rainy night day winter summer sunset fog foggy road street sky water "
    "city house tree trees car dog cat man woman photo painting style van gogh red blue green "
    "black white color colour look like as if were").split()


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies BPE merges (lowest rank first) to one word's pieces."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def make_tiny_tokenizer(folder: str, words: Sequence[str] = TINY_WORDS, model_max_length: int = 77):
    """Writes (save_pretrained) and returns a small ``CLIPTokenizer`` for tests and demos.

    Vocabulary: the 256 byte-level characters, each also with ``</w>`` (so any text tokenizes),
    one token per word in `words` (built by BPE merges), then ``<|startoftext|>``, ``<|endoftext|>``
    (the last two ids, as in CLIP). ``len(tokenizer)`` is the vocab_size of a matching encoder.
    """
    from transformers import CLIPTokenizer
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # merge what is left, left to right, into one token
            ranks[(pieces[0], pieces[1])] = len(ranks)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens.append(pieces[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    merges = sorted(ranks, key=ranks.get)  # (left, right) pairs, highest priority first
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return tok
