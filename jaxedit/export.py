"""Export a training run's model: the denoiser at a checkpoint, LoRA merged, as a diffusers folder.

    python -m jaxedit.export --run=runs/d3po_snow --out=exported            # newest checkpoint
    python -m jaxedit.export --run=runs/d3po_snow --step=20 --out=exported  # checkpoint 20
    python -m jaxedit.export --run=runs/d3po_snow --out=adapter --lora_only # the LoRA adapter only

The run's ``config.json`` rebuilds the pipeline and policy exactly as training did
(`train.build_pipeline`, `train.build_policy`); the trained params are read from
``checkpoints/<step>`` (only those, unless the method saves another tree as its model through its
``model_trainable(state)`` hook, e.g. an EMA in the optimizer state). ``OUT`` gets:

- a complete checkpoint folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` and, for a
  Specialists model, ``style_adapter/``) with the LoRA MERGED into the U-Net: ``jaxedit.sample
  --checkpoint=OUT`` edits with it and ``diffusers.UNet2DConditionModel.from_pretrained(OUT/unet)``
  loads it (not with ``--lora_only``);
- for a LoRA run, ``unet_lora/``: the un-merged adapter in PEFT format,
  ``adapter_model.safetensors`` (``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight``
  (out, r), diffusers module names, no prefix; diffusers' LoRA metadata in the file header) and
  ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``, ...), e.g.
  ``unet.load_lora_adapter(OUT/unet_lora, weight_name="adapter_model.safetensors", prefix=None)``.
  The adapter applies to the run's base U-Net (``base_model_name_or_path``). A Specialists run
  also trains the 12-channel ``conv_in`` and the style adapter in full: they are in
  ``unet_lora/conv_in.safetensors`` (diffusers names) and ``OUT/style_adapter/``, and the base
  is the InstructPix2Pix U-Net with that ``conv_in``.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

ADAPTER_DIR = "unet_lora"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CONV_IN_WEIGHTS = "conv_in.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


class ExportError(ValueError):
    """The run cannot be exported as asked (missing files, unknown step, wrong mode)."""


def read_config(run_dir: str):
    """The run's ``config.json`` (written by `train.train`) as an ml_collections ConfigDict."""
    import ml_collections
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        what = "no such directory" if not os.path.isdir(run_dir) else "no config.json"
        raise ExportError(f"{run_dir}: {what} (expected a training run's workdir, with config.json and checkpoints/)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _manager(run_dir: str):
    import orbax.checkpoint as ocp
    directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    if not os.path.isdir(directory):
        raise ExportError(f"{run_dir}: no checkpoints/ (the run saved no checkpoint yet)")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True, max_to_keep=None, save_interval_steps=0))


def available_steps(run_dir: str) -> list[int]:
    """The steps (= updates) of the run's complete checkpoints, ascending."""
    manager = _manager(run_dir)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_trainable(run_dir: str, step: int, abstract_trainable):
    """The trainable params of checkpoint `step` (only those: the optimizer state is not read),
    on the first local device. `abstract_trainable`: the trainable tree's arrays or shapes."""
    import orbax.checkpoint as ocp
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                               abstract_trainable)}
    manager = _manager(run_dir)
    try:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    finally:
        manager.close()
    return out.state["params"]


def restore_state(run_dir: str, step: int, config, trainable):
    """(train state, meta) of checkpoint `step`, the state on the first local device; its structure
    is the one `train.train` builds (`init_train_state`)."""
    from jaxedit import train
    from jaxedit.checkpoint import Checkpointer
    from jaxedit.rl.update import init_train_state
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda p: init_train_state(p, train.make_optimizer(config)), trainable)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        return ckpt.restore(abstract, step)
    finally:
        ckpt.close()


def model_trainable(config, run_dir: str, step: int, trainable):
    """(the trainable tree the run saves as its model at `step`, the method's checkpointed state):
    the method's static ``model_trainable(state)`` hook when it has one (e.g. an EMA kept in the
    optimizer state; the whole state is then restored), else the trained params (only those are
    read; method state {})."""
    from jaxedit.trainers import METHODS
    hook = getattr(METHODS.get(config.method), "model_trainable", None)
    if hook is None:
        return restore_trainable(run_dir, step, trainable), {}
    state, meta = restore_state(run_dir, step, config, trainable)
    return hook(state), meta.get("method", {})


def lora_adapter_config(config, targets, base: str) -> dict:
    """PEFT's ``adapter_config.json`` for the run's LoRA (``LoraConfig`` keys)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
            "r": int(config.train.lora_rank), "lora_alpha": float(config.train.lora_alpha),
            "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None}


def write_lora_adapter(folder: str, lora_params, adapter_config: dict, conv_in=None) -> None:
    """``folder/adapter_model.safetensors`` + ``adapter_config.json`` (+ ``conv_in.safetensors``)."""
    from jaxedit.models import convert, lora
    from jaxedit.models.state_dict import save_state_dict
    os.makedirs(folder, exist_ok=True)
    weights = {k: np.asarray(jax.device_get(v), np.float32) for k, v in lora.peft_state_dict(lora_params).items()}
    meta = {k: adapter_config[k] for k in ("r", "lora_alpha", "target_modules")}
    save_state_dict(weights, os.path.join(folder, ADAPTER_WEIGHTS), metadata={LORA_METADATA_KEY: json.dumps(meta)})
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2)
    if conv_in is not None:
        save_state_dict(convert.flax_to_torch({"conv_in": jax.device_get(conv_in)}),
                        os.path.join(folder, CONV_IN_WEIGHTS))


def export(run_dir: str, out_dir: str, step: int | None = None, lora_only: bool = False) -> str:
    """Writes the model of the run in `run_dir` at checkpoint `step` (default: newest) to `out_dir`
    (see the module docstring); returns `out_dir`. Raises ExportError (a ValueError) when the run
    has no config.json or checkpoints, `step` is not saved, or `lora_only` is asked of a
    full-fine-tuning run."""
    from jaxedit import train
    from jaxedit.models import load, lora

    config = read_config(run_dir)
    if lora_only and config.train.mode != "lora":
        raise ExportError(f"{run_dir}: --lora_only, but the run fine-tuned the whole model "
                          f"(train.mode={config.train.mode!r}); there is no LoRA adapter to export")
    steps = available_steps(run_dir)
    if not steps:
        raise ExportError(f"{run_dir}: no checkpoints in checkpoints/ (the run saved none yet)")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ExportError(f"{run_dir}: no checkpoint at step {step}; available steps: {', '.join(map(str, steps))}")

    pipe = train.build_pipeline(config, run_dir)
    policy = train.build_policy(config, pipe)
    from jaxedit.trainers import METHODS
    trainable, method_state = model_trainable(config, run_dir, step, policy.trainable)
    os.makedirs(out_dir, exist_ok=True)
    if not lora_only:
        pipe.save_pretrained(out_dir, policy.params(trainable))
        getattr(METHODS[config.method], "write_model_extras", lambda folder, st: None)(out_dir, method_state)
    if config.train.mode == "lora":
        base = os.path.abspath(config.model.checkpoint or os.path.join(run_dir, "tiny-ip2p"))
        write_lora_adapter(os.path.join(out_dir, ADAPTER_DIR), trainable["lora"],
                           lora_adapter_config(config, lora.DEFAULT_TARGETS, base),
                           conv_in=trainable["conv_in"] if pipe.style else None)
        if lora_only and pipe.style:
            load.export_model(trainable["style_adapter"], pipe.unet.adapter_config,
                              os.path.join(out_dir, "style_adapter"))
    return out_dir


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing is side-effect free)."""
    flags.DEFINE_string("run", None, "training run directory (the run's workdir: config.json, checkpoints/).")
    flags.DEFINE_integer("step", None, "checkpoint step (update) to export; default: the newest.")
    flags.DEFINE_string("out", None, "output folder.")
    flags.DEFINE_bool("lora_only", False, "LoRA runs: write only the un-merged adapter (unet_lora/), not the "
                      "merged model.")


def main(argv):
    del argv
    for name in ("run", "out"):
        if not getattr(FLAGS, name):
            print(f"error: --{name} is required", file=sys.stderr)
            return 2
    from absl import logging
    from jaxedit.runtime import enable_compilation_cache
    logging.set_verbosity(logging.ERROR)  # orbax logs every restore (and "read only") at INFO/WARNING
    enable_compilation_cache()
    try:
        out = export(FLAGS.run, FLAGS.out, step=FLAGS.step, lora_only=FLAGS.lora_only)
    except (ValueError, OSError) as e:  # ExportError, CheckpointError, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {FLAGS.run} -> {out}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
