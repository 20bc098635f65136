"""Process-level setup shared by the command-line entry points."""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default ``$JAXEDIT_CACHE`` or ~/.cache/jaxedit/xla).

    Compiling the sampler and the update step takes minutes on a CPU; a second run with the same
    shapes loads them from disk. An explicitly configured ``jax_compilation_cache_dir`` (e.g. the
    ``JAX_COMPILATION_CACHE_DIR`` variable) wins.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = path or os.environ.get("JAXEDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxedit", "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
