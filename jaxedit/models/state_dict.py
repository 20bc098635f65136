"""Read and write PyTorch-format weight files without importing torch.

Handles what diffusers / transformers checkpoint folders hold:
``*.safetensors``, ``*.bin`` (torch zip pickles, read by a restricted unpickler),
sharded checkpoints (``*.index.json``) and precision variants (``*.fp16.*``).
Tensors come back as NumPy arrays keyed by their PyTorch names.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file as _load_safetensors
from safetensors.numpy import save_file as _save_safetensors

import ml_dtypes

# Names tried in order; `{v}` is "" or ".<variant>".
_WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.bin"),
    "transformers": ("model{v}.safetensors", "pytorch_model{v}.bin"),
}


class CheckpointError(ValueError):
    """A checkpoint folder or weight file is missing, unreadable or does not fit the model."""


def find_weight_file(folder: str, variant: str | None = None) -> str:
    """Path of the weight file (or shard index) in a diffusers/transformers model folder.

    Prefers safetensors over .bin; `variant` ("fp16") picks ``name.fp16.ext`` files.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    v = f".{variant}" if variant else ""
    candidates = []
    for names in _WEIGHT_NAMES.values():
        for pattern in names:
            name = pattern.format(v=v)
            candidates += [name, name + ".index.json"]
    for pattern in ("safetensors", "bin"):
        for name in candidates:
            if name.split(".index.json")[0].endswith(pattern) and os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    present = sorted(os.listdir(folder))
    raise CheckpointError(
        f"no weight file{' for variant ' + repr(variant) if variant else ''} in {folder}; "
        f"looked for {', '.join(candidates[::2])}; folder holds {present[:10]}")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Loads a safetensors / .bin file, or a shard index, to {torch_name: np.ndarray}.

    bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays.
    """
    if path.endswith(".index.json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        out: dict[str, np.ndarray] = {}
        folder = os.path.dirname(path)
        for shard in sorted(set(weight_map.values())):
            out.update(load_state_dict(os.path.join(folder, shard)))
        return out
    try:
        if path.endswith(".safetensors"):
            return _load_safetensors(path)
        return _load_torch_zip(path)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt file: say which one
        raise CheckpointError(f"cannot read weight file {path}: {type(e).__name__}: {e}") from e


def save_state_dict(state: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Writes {name: array} as safetensors (contiguous copies; format 'pt' for PyTorch loaders)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    _save_safetensors(arrays, path, metadata={"format": "pt", **(metadata or {})})


# ---------------------------------------------------------------- torch .bin (zip) reader
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
    arr, itemsize = storage, storage.dtype.itemsize
    if len(size) == 0:
        return arr[offset].copy()
    return np.lib.stride_tricks.as_strided(
        arr[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into NumPy; refuses every other global (no code execution)."""

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._zf, self._prefix, self._cache = zf, prefix, {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(_TORCH_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a .bin weight file")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid
        dtype = storage_type.dtype
        if key not in self._cache:
            raw = self._zf.read(f"{self._prefix}/data/{key}")
            self._cache[key] = np.frombuffer(raw, dtype=dtype)
        return self._cache[key]


def _load_torch_zip(path: str) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip archive (legacy pre-1.6 torch.save format or corrupt); "
            "re-save it with a current torch, or convert it to safetensors")
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if not pkl:
            raise CheckpointError(f"{path}: no data.pkl inside the archive")
        prefix = pkl[0][: -len("/data.pkl")]
        with zf.open(pkl[0]) as f:
            obj = _TorchUnpickler(f, zf, prefix).load()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {k: np.asarray(v) for k, v in obj.items()}
