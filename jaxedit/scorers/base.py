"""The scoring interface the trainer sees, and a registry of scorers.

    scorer = make_scorer("simple", lam=0.05)
    scores = scorer(inputs, generated, styles, masks)   # {name: float32 (B,)}, lower is better

Arguments (NumPy): inputs, generated uint8 (B, H, W, 3) RGB; styles uint8 (B, Hs, Ws, 3) (the
style image of each sample; its size may differ from H, W); masks float32 (B, H, W) in [0, 1],
1 = edit region. Every score is per sample and LOWER IS BETTER. `scorer.names` lists the keys
of the returned dict, in a fixed order.

Scorers are registered by name with a lazy "module:attribute" target, so this module (like the
whole `jaxedit.scorers` package's `__init__`, `base` and `simple`) imports neither jax nor torch:
PyTorch-side scorers are imported only when made, inside the scorer process.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Scorer(Protocol):
    """A callable (inputs, generated, styles, masks) -> {name: float32 (B,)}; lower is better."""
    names: tuple[str, ...]

    def __call__(self, inputs: np.ndarray, generated: np.ndarray, styles: np.ndarray,
                 masks: np.ndarray) -> dict[str, np.ndarray]: ...


_REGISTRY: dict[str, str | Callable[..., Scorer]] = {
    "simple": "jaxedit.scorers.simple:SimpleScorer",
    "specialist": "jaxedit.scorers.composite:SpecialistScorer",  # depth needs torch: scorer process
}


def register_scorer(name: str, factory: str | Callable[..., Scorer]) -> None:
    """Registers a scorer factory (a callable, or a lazy "module:attribute" string)."""
    if name in _REGISTRY and _REGISTRY[name] != factory:
        raise ValueError(f"scorer {name!r} is already registered as {_REGISTRY[name]!r}")
    _REGISTRY[name] = factory


def available_scorers() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_scorer(name: str, **kwargs: Any) -> Scorer:
    """Builds the scorer registered as `name` (or the "module:attribute" factory `name`) with
    `kwargs`, e.g. make_scorer("simple", lam=0.05)."""
    factory = _REGISTRY.get(name, name if ":" in name else None)  # or a "module:attribute" target
    if factory is None:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(available_scorers())} "
                         "(or a 'module:attribute' factory)")
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(**kwargs)


def check_batch(inputs, generated, styles, masks) -> tuple[np.ndarray, ...]:
    """Validates the scorer arguments (shapes, dtypes, ranges) and returns them as NumPy arrays."""
    inputs, generated, styles, masks = (np.asarray(x) for x in (inputs, generated, styles, masks))
    for name, x in (("inputs", inputs), ("generated", generated), ("styles", styles)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be uint8 (B, H, W, 3), got {x.dtype} {x.shape}")
    if inputs.shape != generated.shape:
        raise ValueError(f"inputs {inputs.shape} and generated {generated.shape} differ in shape")
    if masks.shape != inputs.shape[:3]:
        raise ValueError(f"masks must be (B, H, W) = {inputs.shape[:3]}, got {masks.shape}")
    if styles.shape[0] != inputs.shape[0]:
        raise ValueError(f"styles has batch {styles.shape[0]}, inputs {inputs.shape[0]}")
    if masks.size and (np.nanmin(masks) < 0 or np.nanmax(masks) > 1 or not np.isfinite(masks).all()):
        raise ValueError("masks must be finite and in [0, 1]")
    return inputs, generated, styles, masks


def check_scores(scores: dict[str, np.ndarray], names: tuple[str, ...], batch: int) -> None:
    """Raises unless `scores` has exactly `names`, each a finite (batch,) array (trainer-side check)."""
    if set(scores) != set(names):
        raise ValueError(f"scorer returned {tuple(scores)}, expected {tuple(names)}")
    for k, v in scores.items():
        v = np.asarray(v)
        if v.shape != (batch,) or not np.isfinite(v).all():
            raise ValueError(f"score {k!r} must be finite with shape ({batch},), got {v.shape}")


class InProcessQueue:
    """An in-process scorer behind the ``submit``/``result`` interface of the scorer process's
    client (`jaxedit.scorers.shm_queue.ScorerClient`): it scores at ``submit``."""

    def __init__(self, scorer: Scorer):
        self.scorer, self.names = scorer, tuple(scorer.names)
        self._results: dict[int, dict[str, np.ndarray]] = {}
        self._next = 0

    def submit(self, *, inputs, generated, styles, masks) -> int:
        rid, self._next = self._next, self._next + 1
        self._results[rid] = self.scorer(inputs, generated, styles, masks)
        return rid

    def result(self, rid: int) -> dict[str, np.ndarray]:
        return self._results.pop(rid)

    def close(self) -> None:
        self._results.clear()
