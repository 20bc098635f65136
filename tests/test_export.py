"""`python -m jaxedit.export`: a tiny LoRA run (Specialists model) exported with the LoRA merged
loads in diffusers PyTorch and equals the un-merged LoRA forward; the PEFT adapter has diffusers'
names and merges by hand into the base to the exported weights; LoRA at init samples exactly
like the base model; clear errors."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import traverse_util
from safetensors import safe_open

from jaxedit import export, train
from jaxedit.diffusion import SpecialistCond, sample
from jaxedit.models import lora, unet
from jaxedit.models.state_dict import load_state_dict
from tests.test_train import ROOT, tiny_config
from tests.torch_ref import assert_close, nhwc

UPDATES = 2
# A large learning rate, so that two updates move the LoRA far from zero (B = 0 at init) and a
# dropped or wrongly scaled LoRA is far outside the tolerances below.
LORA_RUN = {"train.mode": "lora", "train.updates": UPDATES, "train.lr": 1e-2, "checkpoint.every": 1,
            "eval.every": 0, "log.images_every": 0, "log.tensorboard": False,
            "sample.batch_size": 4, "train.samples_per_update": 4, "train.micro_batch": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, train() result, export folder of the newest checkpoint)."""
    workdir = tmp_path_factory.mktemp("lora_run")
    config = tiny_config(workdir, **LORA_RUN)
    result = train.train(config, log=lambda s: None)
    assert int(result["state"].step) == UPDATES  # no update was skipped
    out = str(tmp_path_factory.mktemp("export") / "model")
    assert export.export(str(workdir), out) == out
    return workdir, result, out


def _torch_unet(folder):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(folder).eval()


def _lora_forward(module, params, lora_params, scale, x, t, ctx):
    """The U-Net with an UN-merged LoRA: every targeted Dense computes x W + b + scale · (x A) B."""
    flat = traverse_util.flatten_dict(lora_params)
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path + ("lora_A",) in flat:
            calls.append(path)
            y = y + scale * ((args[0] @ flat[path + ("lora_A",)]) @ flat[path + ("lora_B",)])
        return y

    def apply(params, lora_params, x, t, ctx):
        nonlocal flat
        flat = traverse_util.flatten_dict(lora_params)
        with nn.intercept_methods(interceptor):
            return module.apply({"params": params}, x, t, ctx)

    out = jax.jit(apply)(params, lora_params, x, t, ctx)
    assert sorted(calls) == sorted({p[:-1] for p in flat})  # every LoRA layer, once (traced once)
    return out


def test_merged_export_loads_in_diffusers_and_equals_unmerged_lora(run):
    workdir, result, out = run
    policy, pipe = result["policy"], result["pipeline"]
    trained = jax.device_get(result["state"].params)
    config = tiny_config(workdir, **LORA_RUN)
    scale = lora.lora_scale(config.train.lora_rank, config.train.lora_alpha)
    torch_unet = _torch_unet(os.path.join(out, "unet"))
    assert torch_unet.config.in_channels == 12  # the Specialists U-Net

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 8, 8, generator=g)
    t = torch.tensor([3, 917])
    ctx = torch.randn(2, 7, pipe.unet.unet_config.cross_attention_dim[0], generator=g)
    with torch.no_grad():
        ref = nhwc(torch_unet(x, t, ctx).sample)

    module = unet.build(pipe.unet.unet_config)
    base = jax.device_get(policy.ref_params["unet"])
    base = {**base, "conv_in": trained["conv_in"]}  # trained in full alongside the LoRA
    args = jnp.asarray(nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    got = _lora_forward(module, base, trained["lora"], scale, *args)
    rel = assert_close(got, ref, rel=1e-4)
    # The LoRA matters: without it the output is far off.
    without = np.asarray(jax.jit(lambda p, *a: module.apply({"params": p}, *a))(base, *args))
    moved = np.abs(without - ref).max() / np.abs(ref).max()
    print(f"merged export (diffusers) vs un-merged LoRA (JAX): {rel:.2e}; LoRA's effect {moved:.2e}")
    assert moved > 1e-2


def test_lora_at_init_samples_exactly_like_the_base_model(run):
    workdir, result, _ = run
    config = tiny_config(workdir, **LORA_RUN)
    pipe = train.build_pipeline(config, str(workdir))
    policy = train.build_policy(config, pipe)  # fresh: LoRA B = 0
    k = jax.random.split(jax.random.key(1), 3)
    latents = jax.random.normal(k[0], (2, 8, 8, 4))
    cond = SpecialistCond(latents, jax.random.normal(k[1], (2, 8, 8, 4)), pipe.encode_text(["add snow"] * 2),
                          pipe.encode_text([""]))
    x_T = jax.random.normal(k[2], (2, 8, 8, 4))
    run_sampler = lambda params: np.asarray(sample(pipe.denoise, params, cond, pipe.schedule, x_T,
                                                   jax.random.key(2), steps=3, sampler="ddim"))
    base = run_sampler(pipe.denoiser_params)
    np.testing.assert_array_equal(run_sampler(policy.params(policy.trainable)), base)
    trained = run_sampler(policy.params(jax.device_get(result["state"].params)))
    assert np.abs(trained - base).max() > 1e-3  # ... and the trained LoRA does change the samples


def _peft_targets(module, targets):
    """diffusers Linear modules PEFT wraps for `targets` (its suffix rule): name -> (out, in)."""
    return {name: tuple(m.weight.shape) for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}


def test_peft_adapter_names_and_merge_by_hand(run):
    workdir, result, out = run
    folder = os.path.join(out, export.ADAPTER_DIR)
    cfg = json.load(open(os.path.join(folder, export.ADAPTER_CONFIG)))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    assert (r, alpha, cfg["target_modules"], cfg["peft_type"]) == (4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], "LORA")
    assert cfg["base_model_name_or_path"] == os.path.join(str(workdir), "tiny-ip2p")
    path = os.path.join(folder, export.ADAPTER_WEIGHTS)
    with safe_open(path, "np") as f:  # diffusers' load_lora_adapter reads the LoRA config from here
        assert json.loads(f.metadata()[export.LORA_METADATA_KEY]) == {k: cfg[k] for k in ("r", "lora_alpha",
                                                                                        "target_modules")}
    adapter = load_state_dict(path)

    merged = load_state_dict(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    targets = _peft_targets(_torch_unet(os.path.join(out, "unet")), cfg["target_modules"])
    assert len(targets) == 32
    want = {}
    for name, (d_out, d_in) in targets.items():
        want[f"{name}.lora_A.weight"], want[f"{name}.lora_B.weight"] = (r, d_in), (d_out, r)
    assert {k: v.shape for k, v in adapter.items()} == want
    # The adapter is the trained state's LoRA (the newest checkpoint).
    trained = jax.device_get(result["state"].params)
    for k, v in lora.peft_state_dict(trained["lora"]).items():
        np.testing.assert_array_equal(adapter[k], np.asarray(v), err_msg=k)

    # Base (the run's InstructPix2Pix U-Net with the trained 12-channel conv_in) + alpha/r · B @ A
    # (torch layout, float64) = the merged export, for every tensor.
    sd = dict(load_state_dict(os.path.join(str(workdir), "tiny-ip2p", "unet", "diffusion_pytorch_model.safetensors")))
    conv_in = load_state_dict(os.path.join(folder, export.CONV_IN_WEIGHTS))
    assert set(conv_in) == {"conv_in.weight", "conv_in.bias"} and conv_in["conv_in.weight"].shape[1] == 12
    sd.update(conv_in)
    delta = 0.0
    for name in targets:
        d = alpha / r * (adapter[f"{name}.lora_B.weight"].astype(np.float64) @ adapter[f"{name}.lora_A.weight"])
        delta = max(delta, np.abs(d).max())
        sd[f"{name}.weight"] = sd[f"{name}.weight"] + d
    assert set(sd) == set(merged) and delta > 1e-2
    err = max(np.abs(sd[k] - merged[k]).max() for k in sd)
    print(f"hand-merged PEFT adapter vs merged export: max |diff| {err:.2e} (max |alpha/r B A| {delta:.2e})")
    assert err < 1e-5


def test_step_and_lora_only(run, tmp_path):
    """lora_only at an older step: only the adapter (+ the style adapter)."""
    workdir, _, out = run
    export.export(str(workdir), str(tmp_path), step=1, lora_only=True)
    assert sorted(os.listdir(tmp_path)) == ["style_adapter", "unet_lora"]
    assert sorted(os.listdir(tmp_path / "unet_lora")) == sorted([export.ADAPTER_WEIGHTS, export.ADAPTER_CONFIG,
                                                                 export.CONV_IN_WEIGHTS])
    step1 = load_state_dict(str(tmp_path / "unet_lora" / export.ADAPTER_WEIGHTS))
    step2 = load_state_dict(os.path.join(out, "unet_lora", export.ADAPTER_WEIGHTS))
    assert step1.keys() == step2.keys()
    b = [k for k in step1 if "lora_B" in k]
    assert all(np.abs(step1[k]).max() > 0 for k in b)  # trained once ...
    assert max(np.abs(step1[k] - step2[k]).max() for k in b) > 1e-3  # ... and not the newest


def test_whole_state_and_model_trainable_hook(run, tmp_path, monkeypatch):
    """A method with a ``model_trainable(state)`` hook (e.g. an EMA in the optimizer state): the
    whole state is restored (as train() left it) and the hook's tree is exported."""
    from jaxedit import trainers
    workdir, result, _ = run
    config = export.read_config(str(workdir))
    policy = train.build_policy(config, train.build_pipeline(config, str(workdir)))
    state, meta = export.restore_state(str(workdir), UPDATES, config, policy.trainable)
    assert meta["update"] == UPDATES
    want = jax.device_get(result["state"])
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    class WithHook(trainers.METHODS[config.method]):
        @staticmethod
        def model_trainable(state):
            return jax.tree_util.tree_map(lambda p: 2 * p, state.params)
    monkeypatch.setitem(trainers.METHODS, config.method, WithHook)
    export.export(str(workdir), str(tmp_path), lora_only=True)
    got = load_state_dict(str(tmp_path / "unet_lora" / export.ADAPTER_WEIGHTS))
    for k, v in lora.peft_state_dict(want.params["lora"]).items():
        np.testing.assert_array_equal(got[k], 2 * np.asarray(v), err_msg=k)


def test_errors(run, tmp_path):
    workdir, _, _ = run
    out = str(tmp_path / "out")
    with pytest.raises(export.ExportError, match="no such directory"):
        export.export(str(tmp_path / "nowhere"), out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(export.ExportError, match="no config.json"):
        export.export(str(empty), out)
    shutil.copy(workdir / "config.json", empty / "config.json")
    with pytest.raises(export.ExportError, match="no checkpoints/"):
        export.export(str(empty), out)
    (empty / "checkpoints").mkdir()
    with pytest.raises(export.ExportError, match="no checkpoints in checkpoints/"):
        export.export(str(empty), out)
    with pytest.raises(export.ExportError, match="no checkpoint at step 7; available steps: 1, 2"):
        export.export(str(workdir), out, step=7)
    full = tmp_path / "full"
    full.mkdir()
    config = json.load(open(workdir / "config.json"))
    config["train"]["mode"] = "full"
    (full / "config.json").write_text(json.dumps(config))
    with pytest.raises(export.ExportError, match=r"--lora_only, but the run fine-tuned the whole model"):
        export.export(str(full), out, lora_only=True)
    assert not os.path.exists(out)  # nothing written on an error
    # The CLI (its flags reach `export`): one line on stderr, exit code 1.
    cli = [sys.executable, "-m", "jaxedit.export", f"--out={out}"]
    proc = subprocess.run(cli + [f"--run={workdir}", "--step=7"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {workdir}: no checkpoint at step 7; available steps: 1, 2")
    proc = subprocess.run(cli + [f"--run={full}", "--lora_only"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "error: " in proc.stderr and "--lora_only, but" in proc.stderr
