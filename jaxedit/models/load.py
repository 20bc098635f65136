"""Load diffusers-format checkpoints into jaxedit's Flax modules, and export them back.

A model folder holds ``config.json`` plus weights (``*.safetensors`` or ``*.bin``, optionally
sharded or as a precision variant). A whole checkpoint holds ``unet/ vae/ text_encoder/
tokenizer/ scheduler/``. Every loader returns ``(module, params)`` with fp32 params by default.

Each model file (unet.py, vae.py, text.py) provides the same small contract used here:
``Config.from_dict(d)`` (validates; clear error on unsupported fields), ``config.to_dict()``
(the on-disk ``config.json``), a module class built as ``Model(config, dtype=...)`` with
``module.dummy_inputs()`` for shape inference, and ``fix_torch_keys(state)`` for legacy names.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.models import convert, state_dict, style_adapter, text, unet, vae
from jaxedit.models.state_dict import CheckpointError

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {os.path.basename(path)} in {os.path.dirname(path) or '.'}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def abstract_params(module) -> Any:
    """Parameter shapes/dtypes of `module` (no compute, no compile): a tree of ShapeDtypeStruct."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]


def random_params(module, seed: int = 0, std: float | None = None) -> dict:
    """Every parameter drawn at random with NumPy (no XLA init compile).

    Kernels ~ N(0, 1/fan_in) (or `std`), biases ~ N(0, 0.02), norm scales ~ 1 + N(0, 0.1),
    embeddings ~ N(0, 0.02): nothing is left at zero, so tests cannot be fooled by zero inits.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        shape = tuple(leaf.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            s = std if std is not None else fan_in ** -0.5
            return rng.normal(0.0, s, shape).astype(np.float32)
        if name == "scale":
            return (1.0 + rng.normal(0.0, 0.1, shape)).astype(np.float32)
        return rng.normal(0.0, 0.02, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(module))


def _load_model(folder: str, model_mod, *, what: str, dtype, param_dtype, variant) -> tuple[Any, dict]:
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    config = model_mod.Config.from_dict(read_json(os.path.join(folder, "config.json")))
    module = model_mod.build(config, dtype=dtype)
    state = model_mod.fix_torch_keys(state_dict.load_state_dict(state_dict.find_weight_file(folder, variant)))
    params = convert.torch_to_flax(state, abstract_params(module), dtype=param_dtype, what=what)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def load_unet(folder: str, *, dtype=jnp.float32, param_dtype=np.float32, variant: str | None = None):
    """diffusers ``UNet2DConditionModel`` folder -> (`unet.UNet2DConditionModel`, params)."""
    return _load_model(folder, unet, what=f"U-Net ({folder})", dtype=dtype, param_dtype=param_dtype,
                       variant=variant)


def load_vae(folder: str, *, dtype=jnp.float32, param_dtype=np.float32, variant: str | None = None):
    """diffusers ``AutoencoderKL`` folder -> (`vae.AutoencoderKL`, params)."""
    return _load_model(folder, vae, what=f"VAE ({folder})", dtype=dtype, param_dtype=param_dtype,
                       variant=variant)


def load_text_encoder(folder: str, *, dtype=jnp.float32, param_dtype=np.float32, variant: str | None = None):
    """transformers ``CLIPTextModel`` folder -> (`text.CLIPTextModel`, params)."""
    return _load_model(folder, text, what=f"text encoder ({folder})", dtype=dtype,
                       param_dtype=param_dtype, variant=variant)


def load_style_adapter(folder: str, *, dtype=jnp.float32, param_dtype=np.float32):
    """jaxedit ``style_adapter/`` folder -> (`style_adapter.StyleAdapter`, params)."""
    return _load_model(folder, style_adapter, what=f"style adapter ({folder})", dtype=dtype,
                       param_dtype=param_dtype, variant=None)


@dataclasses.dataclass
class Checkpoint:
    """A whole diffusers-format checkpoint: modules, params, tokenizer and scheduler config."""
    unet: Any
    unet_params: dict
    vae: Any
    vae_params: dict
    text_encoder: Any
    text_params: dict
    tokenizer: Any
    scheduler_config: dict
    path: str


def load_checkpoint(path: str, *, dtype=jnp.float32, param_dtype=np.float32,
                    variant: str | None = None) -> Checkpoint:
    """Loads ``path/{unet,vae,text_encoder,tokenizer,scheduler}`` (a diffusers pipeline folder)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    missing = [s for s in SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise CheckpointError(f"{path} is not a diffusers checkpoint: missing subfolder(s) {missing}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
    u, up = load_unet(os.path.join(path, "unet"), **kw)
    v, vp = load_vae(os.path.join(path, "vae"), **kw)
    t, tp = load_text_encoder(os.path.join(path, "text_encoder"), **kw)
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    return Checkpoint(u, up, v, vp, t, tp, text.load_tokenizer(os.path.join(path, "tokenizer")),
                      read_json(sched), path)


def expand_conv_in(params: dict, in_channels: int) -> dict:
    """U-Net params with ``conv_in`` widened to `in_channels` inputs.

    The old kernel is copied into the first input channels and the new ones are zero, so the
    expanded model computes exactly what the old one did when given the old channels first.
    """
    kernel = params["conv_in"]["kernel"]  # (3, 3, Cin, C0)
    old = kernel.shape[2]
    if in_channels < old:
        raise ValueError(f"expand_conv_in: cannot shrink conv_in from {old} to {in_channels} channels")
    pad = jnp.zeros(kernel.shape[:2] + (in_channels - old,) + kernel.shape[3:], kernel.dtype)
    conv_in = dict(params["conv_in"], kernel=jnp.concatenate([kernel, pad], axis=2))
    return {**params, "conv_in": conv_in}


def export_model(params: dict, config: Any, folder: str, *, dtype=np.float32) -> str:
    """Writes ``config.json`` + safetensors weights that diffusers/transformers PyTorch load.

    Returns the weight file's path. `config` is a unet/vae/text ``Config``.
    """
    os.makedirs(folder, exist_ok=True)
    cfg = config.to_dict()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    name = "model.safetensors" if "architectures" in cfg else "diffusion_pytorch_model.safetensors"
    path = os.path.join(folder, name)
    tmp = path + ".tmp"
    state_dict.save_state_dict(convert.flax_to_torch(jax.device_get(params), dtype=dtype), tmp)
    os.replace(tmp, path)
    return path


def export_unet(params: dict, config: "unet.Config", folder: str, *, dtype=np.float32) -> str:
    """U-Net params -> folder loadable by ``diffusers.UNet2DConditionModel.from_pretrained``."""
    return export_model(params, config, folder, dtype=dtype)
