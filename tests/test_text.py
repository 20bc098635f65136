"""CLIP text encoder: parity with transformers PyTorch, loading formats, export, tokenizer."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import CLIPConfig, CLIPTextConfig, CLIPTokenizer
from transformers import CLIPTextModel as TorchCLIPText

from jaxedit.models import load, text
from jaxedit.models.state_dict import CheckpointError
from tests.torch_ref import assert_close, randomize_

PROMPTS = ["make it snow", "Turn the road into a painting by Van Gogh!", "",
           "what would it look like if the city were under water? " * 8]  # the last one is truncated
TINY = dict(hidden_size=32, num_attention_heads=4, max_position_embeddings=77, projection_dim=16)
VARIANTS = {
    # name: (extra config, weight format)
    "quick_gelu_safetensors": (dict(num_hidden_layers=2, intermediate_size=37, hidden_act="quick_gelu"),
                               "safetensors"),
    "gelu_bin": (dict(num_hidden_layers=3, intermediate_size=64, hidden_act="gelu"), "bin"),
    # SD 1.x's text_encoder/config.json says bos=0, pad=1, eos=2: transformers' legacy pooling rule.
    "legacy_eos2_safetensors": (dict(num_hidden_layers=2, intermediate_size=37, hidden_act="quick_gelu",
                                     bos_token_id=0, pad_token_id=1, eos_token_id=2), "safetensors"),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    text.make_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return text.load_tokenizer(tokenizer_dir)


def _torch_config(tokenizer, **extra):
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(vocab_size=len(tokenizer), **TINY, **{**ids, **extra})


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tokenizer, tmp_path_factory):
    extra, fmt = VARIANTS[request.param]
    model = randomize_(TorchCLIPText(_torch_config(tokenizer, **extra)), seed=len(request.param))
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder)
    if fmt == "bin":  # transformers 5 writes safetensors only: write a 4.x-style pytorch_model.bin
        state = {"text_model." + k: v for k, v in model.state_dict().items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        os.remove(os.path.join(folder, "model.safetensors"))
    return model, folder


def _torch_run(model, ids):
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids), dtype=torch.long))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _jax_run(module, params, ids):
    return jax.jit(module.apply)({"params": params}, jnp.asarray(ids, jnp.int32))


def _input_ids(tokenizer, kind):
    if kind == "prompts":
        return text.tokenize(tokenizer, PROMPTS, 77)
    # random ids (no EOS unless drawn): exercises both pooling rules on arbitrary inputs; L < 77
    return np.random.default_rng(1).integers(0, len(tokenizer), (2, 20)).astype(np.int32)


@pytest.mark.parametrize("kind", ["prompts", "random_ids"])
def test_matches_transformers(saved, tokenizer, kind):
    model, folder = saved
    module, params = load.load_text_encoder(folder)
    assert module.config == text.Config.from_dict(model.config.to_dict())
    ids = _input_ids(tokenizer, kind)
    hidden, pooled = _jax_run(module, params, ids)
    ref_hidden, ref_pooled = _torch_run(model, ids)
    assert hidden.dtype == jnp.float32 and hidden.shape == ref_hidden.shape
    rel_h = assert_close(hidden, ref_hidden)
    rel_p = assert_close(pooled, ref_pooled)
    print(f"\n{os.path.basename(folder)} {kind}: hidden max abs {np.abs(hidden - ref_hidden).max():.3g} "
          f"(rel {rel_h:.3g}), pooled max abs {np.abs(pooled - ref_pooled).max():.3g} (rel {rel_p:.3g})")


def test_legacy_state_dict_and_missing_tensor(saved, tokenizer, tmp_path):
    model, folder = saved
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    # transformers 4.x layout: "text_model." prefix and the position_ids buffer (+ a CLIPModel scalar).
    legacy = {"text_model." + k: v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    legacy["logit_scale"] = np.array(2.6592, np.float32)
    os.makedirs(tmp_path / "legacy")
    save_file(legacy, str(tmp_path / "legacy" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(cfg))
    module, params = load.load_text_encoder(str(tmp_path / "legacy"))
    ids = _input_ids(tokenizer, "prompts")
    for a, b in zip(_jax_run(module, params, ids), _torch_run(model, ids)):
        assert_close(a, b)

    del state["encoder.layers.1.mlp.fc2.bias"]
    os.makedirs(tmp_path / "missing")
    save_file(state, str(tmp_path / "missing" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "missing" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load.load_text_encoder(str(tmp_path / "missing"))


def test_export_loads_in_transformers(saved, tokenizer, tmp_path):
    model, folder = saved
    module, params = load.load_text_encoder(folder)
    path = load.export_model(params, module.config, str(tmp_path / "export"))
    assert os.path.basename(path) == "model.safetensors"
    again, info = TorchCLIPText.from_pretrained(str(tmp_path / "export"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert text.Config.from_dict(again.config.to_dict()) == module.config
    ids = _input_ids(tokenizer, "prompts")
    for a, b in zip(_torch_run(again.eval(), ids), _torch_run(model, ids)):
        assert_close(a, b, rel=1e-6)


def test_bf16_compute_close(saved, tokenizer):
    model, folder = saved
    module, params = load.load_text_encoder(folder, dtype=jnp.bfloat16)
    ids = _input_ids(tokenizer, "prompts")
    hidden, pooled = _jax_run(module, params, ids)
    assert hidden.dtype == pooled.dtype == jnp.bfloat16
    assert params["text_model"]["final_layer_norm"]["scale"].dtype == jnp.float32
    ref_hidden, ref_pooled = _torch_run(model, ids)
    assert_close(hidden, ref_hidden, rel=5e-2)
    assert_close(pooled, ref_pooled, rel=5e-2)


# ---------------------------------------------------------------- config
def test_config_from_dict():
    base = CLIPTextConfig(vocab_size=99, **TINY, num_hidden_layers=2, intermediate_size=37,
                          bos_token_id=97, eos_token_id=98, pad_token_id=98)
    config = text.Config.from_dict(base.to_dict())
    assert (config.vocab_size, config.hidden_size, config.eos_token_id) == (99, 32, 98)
    assert text.Config.from_dict(config.to_dict()) == config
    assert config.to_dict()["architectures"] == ["CLIPTextModel"]
    full = CLIPConfig(text_config=base.to_dict(), vision_config=dict(hidden_size=32, num_attention_heads=4))
    assert text.Config.from_dict(full.to_dict()) == config
    # stable-diffusion-v1-5 text_encoder/config.json (transformers 4.x)
    sd15 = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
            "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
            "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
            "transformers_version": "4.22.0.dev0", "vocab_size": 49408}
    assert text.Config.from_dict(sd15) == text.Config(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    with pytest.raises(CheckpointError, match="hidden_act"):
        text.Config.from_dict({**base.to_dict(), "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match="rotary_dim"):
        text.Config.from_dict({**base.to_dict(), "rotary_dim": 8})


def test_fix_torch_keys():
    x = np.zeros(1)
    got = text.fix_torch_keys({"embeddings.position_ids": x, "text_model.embeddings.position_ids": x,
                               "final_layer_norm.weight": x, "text_model.final_layer_norm.bias": x,
                               "vision_model.post_layernorm.weight": x, "logit_scale": x})
    assert sorted(got) == ["text_model.final_layer_norm.bias", "text_model.final_layer_norm.weight"]


def test_sequence_too_long_raises(tokenizer):
    module = text.build(text.Config.from_dict(_torch_config(tokenizer).to_dict()))
    with pytest.raises(ValueError, match="input_ids"):
        module.init(jax.random.key(0), jnp.zeros((1, 78), jnp.int32))


# ---------------------------------------------------------------- tokenizer
def test_tiny_tokenizer(tokenizer, tokenizer_dir, tmp_path):
    assert isinstance(tokenizer, CLIPTokenizer)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == len(tokenizer) and tokenizer.eos_token_id == len(vocab) - 1
    ids = text.tokenize(tokenizer, PROMPTS + ["héllo 日本 ☃ unknownword"], 77)
    assert ids.dtype == np.int32 and ids.shape == (5, 77)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert list(ids[0, :5]) == [tokenizer.bos_token_id, vocab["make</w>"], vocab["it</w>"], vocab["snow</w>"],
                                tokenizer.eos_token_id]
    assert (ids[0, 5:] == tokenizer.pad_token_id).all()
    assert ids[3, -1] == tokenizer.eos_token_id and (ids[3, :-1] != tokenizer.eos_token_id).all()  # truncated
    assert tokenizer.decode(ids[4], skip_special_tokens=True) == "héllo 日本 ☃ unknownword"
    # Round trips: save_pretrained folder, and SD 1.x's layout (vocab.json + merges.txt only).
    again = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert (text.tokenize(again, PROMPTS, 77) == ids[:4]).all()
    merges = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))["model"]["merges"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    assert (text.tokenize(text.load_tokenizer(str(tmp_path)), PROMPTS, 77) == ids[:4]).all()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        text.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        text.load_tokenizer(str(tmp_path))


def test_import_does_not_load_torch():
    code = "import sys, jaxedit.models.text; assert 'torch' not in sys.modules, 'torch imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
