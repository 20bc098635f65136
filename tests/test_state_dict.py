"""Weight-file reading without torch: .bin via a restricted unpickler, safetensors, shards."""
import os
import pickle
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from jaxedit.models import convert, state_dict
from jaxedit.models.state_dict import CheckpointError


def test_bin_reader_matches_torch_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    tensors = {
        "f32": torch.randn(3, 4, 2, 2, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(5),
        "scalar": torch.tensor(3.5),
        "view_t": base.t(),            # non-contiguous view: strides matter
        "view_slice": base[2:, 1:4],   # storage offset
        "shared": base,                # same storage as the views
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)
    got = state_dict.load_state_dict(str(path))
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert got[k].shape == tuple(t.shape), k
        np.testing.assert_array_equal(np.asarray(got[k], dtype=want.dtype), want, err_msg=k)
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["f16"].dtype == np.float16


def test_bin_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.bin"
    torch.save({"x": torch.zeros(1), "y": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        state_dict.load_state_dict(str(path))


def test_not_a_zip_is_named(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a torch zip archive"):
        state_dict.load_state_dict(str(path))


def test_find_weight_file_prefers_safetensors_and_lists_folder(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    assert state_dict.find_weight_file(str(tmp_path)).endswith("diffusion_pytorch_model.bin")
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert state_dict.find_weight_file(str(tmp_path)).endswith(".safetensors")
    with pytest.raises(CheckpointError, match="folder holds"):
        state_dict.find_weight_file(str(tmp_path), variant="fp16")


def test_names_round_trip():
    for key in ["down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
                "time_embedding.linear_1.weight", "text_model.encoder.layers.11.mlp.fc1.bias",
                "up_blocks.3.resnets.2.conv_shortcut.weight", "mid_block.attentions.0.ff.net.2.bias"]:
        path = convert.torch_key_to_path(key)
        assert convert.path_to_torch_key(path[:-1]) + "." + path[-1] == key
    assert convert.torch_key_to_path("time_embedding.linear_1.weight") == ("time_embedding", "linear_1", "weight")


def test_jax_side_does_not_import_torch():
    code = ("import sys; import jaxedit.models.load, jaxedit.models.tiny, jaxedit.models.style_adapter; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
