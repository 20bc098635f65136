"""FSDP sharding by logical axis names: the PartitionSpecs of the SD-1.5 U-Net's parameters, LoRA
and optimizer state on an abstract 2 x 8 mesh (no devices needed), and mesh construction errors.
Numerical equality of updates across 1/2/4-device meshes: tests/test_train.py (subprocess)."""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxedit import parallel
from jaxedit.models import load, lora, unet
from jaxedit.tools.memory import unet_config

MESH = AbstractMesh((2, 8), ("data", "fsdp"))


@pytest.fixture(scope="module")
def sd15():
    return load.abstract_params(unet.build(unet_config("sd15", None)))


def flat_specs(tree, **kw):
    return traverse_util.flatten_dict(parallel.param_specs(tree, MESH, **kw), sep="/")


def test_sd15_unet_specs(sd15):
    specs = flat_specs(sd15)
    attn = "down_blocks_0/attentions_0/transformer_blocks_0"
    expect = {
        "conv_in/kernel": P(None, None, None, "fsdp"),                         # (3,3,8,320): out channels
        "conv_out/kernel": P(None, None, None, None),                          # (3,3,320,4): < MIN_SIZE entries
        f"{attn}/attn1/to_q/kernel": P(None, "fsdp"),                          # (320, 320)
        f"{attn}/attn2/to_k/kernel": P(None, "fsdp"),                          # (768, 320)
        f"{attn}/ff/net_0/proj/kernel": P(None, "fsdp"),                       # (320, 2560)
        "time_embedding/linear_1/kernel": P(None, "fsdp"),                     # (320, 1280)
        "mid_block/resnets_0/conv1/kernel": P(None, None, None, "fsdp"),       # (3,3,1280,1280)
        f"{attn}/norm1/scale": P(None),                                        # 320 entries: replicated
        "conv_in/bias": P(None),
    }
    for name, spec in expect.items():
        assert specs[name] == spec, (name, specs[name])
    assert all("data" not in tuple(s) for s in specs.values())  # params are never split over data
    assert flat_specs(sd15, min_size=0)["conv_out/kernel"] == P(None, None, "fsdp", None)  # 4 % 8: in channels
    # Essentially everything is split 8 ways: per-device bytes ~ 1/8 of the 3.4 GB.
    d = parallel.describe(sd15, MESH)
    assert d["bytes"] > 3.3e9 and d["bytes_per_device"] < 0.127 * d["bytes"], d


def test_optimizer_state_mirrors_params(sd15):
    params = {"conv_in": sd15["conv_in"], "time_embedding": sd15["time_embedding"]}
    opt_state = jax.eval_shape(optax.adamw(1e-4).init, params)
    specs = parallel.param_specs(opt_state, MESH)
    adam = specs[0]
    assert adam.count == P() and adam.mu == adam.nu == parallel.param_specs(params, MESH)


def test_lora_and_small_leaves():
    base = {"attn1": {"to_q": {"kernel": jax.ShapeDtypeStruct((320, 320), jnp.float32)}}}
    tree = jax.eval_shape(lambda: lora.init_lora(base, rank=4, key=jax.random.key(0)))
    specs = flat_specs(tree)
    assert specs["attn1/to_q/lora_A"] == specs["attn1/to_q/lora_B"] == P(None, None)  # 1280 entries < MIN_SIZE
    specs = flat_specs(tree, min_size=0)
    assert specs["attn1/to_q/lora_A"] == P("fsdp", None) and specs["attn1/to_q/lora_B"] == P(None, "fsdp")


def test_partition_spec_rules():
    sizes = {"data": 2, "fsdp": 8}
    conv = ("kernel_h", "kernel_w", "conv_in", "conv_out")
    assert parallel.partition_spec(conv, (3, 3, 12, 20), sizes, min_size=0) == P(None, None, None, None)  # no divisor
    assert parallel.partition_spec(conv, (3, 3, 16, 20), sizes, min_size=0) == P(None, None, "fsdp", None)
    assert parallel.partition_spec(conv, (3, 3, 16, 16), {"data": 8, "fsdp": 1}, min_size=0) == P(None, None, None, None)
    assert parallel.logical_axes(("x", "embedding"), (49408, 768)) == ("vocab", "embed")
    assert parallel.logical_axes(("x", "position_ids"), (1, 77)) == (None, None)


def test_make_mesh_and_errors():
    n = jax.device_count()
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": n, "fsdp": 1}
    assert dict(parallel.make_mesh(1, -1).shape) == {"data": 1, "fsdp": n}
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.make_mesh(-1, -1)
    with pytest.raises(ValueError, match=rf"mesh.data=1 x mesh.fsdp={2 * n} = {2 * n} devices, but there are {n}"):
        parallel.make_mesh(1, 2 * n)
    assert parallel.batch_sharding(mesh, 1).spec == P(None, ("data", "fsdp"))
