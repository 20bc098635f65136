"""Scores of edited images (lower is better): the interface and the weight-free scorer.

`make_scorer(name, **kwargs)` builds a registered scorer; "simple" (`simple.SimpleScorer`) runs
in-process with NumPy. This package's `__init__`, `base` and `simple` import neither jax nor
torch; PyTorch-side scorers (server, depth, DreamSim, ...) are imported only in the scorer process.
"""
from jaxedit.scorers.base import Scorer, available_scorers, check_scores, make_scorer, register_scorer

__all__ = ["Scorer", "available_scorers", "check_scores", "make_scorer", "register_scorer"]
