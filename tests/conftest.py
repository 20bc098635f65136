"""Test-session setup: offline hubs, persistent JAX compilation cache, shared tiny models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import jax  # noqa: E402

_CACHE = os.environ.get("JAXEDIT_TEST_CACHE",
                        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "jax"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of the tiny random InstructPix2Pix checkpoint (diffusers format), built once per worker."""
    from jaxedit.models.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny-ip2p"))


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny torch models run several times faster on one thread on a shared 2-core machine; the
    previous thread count is restored after the module. Use: ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
