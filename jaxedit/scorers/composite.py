"""The Specialists scorer: a structural score of choice + the semantic score, one request.

    SpecialistScorer(structural="depth", depth_weights="/models/depth-anything-v2-small-hf")

structural: "depth" (Depth Anything V2, `depth.DepthScorer`; ``depth_weights`` a local
transformers-format folder, or "tiny" for a small RANDOM model in tests), "edges" (Canny,
`edges.EdgeScorer`) or "sobel" (the weight-free Sobel score of `simple.SimpleScorer`).
semantic: the weight-free masked statistics + λ·pixel term of `simple.SimpleScorer` (the
DreamSim / CLIP / DINOv2 embedding distance replaces its style term when configured; see the
scorer issue). Lower is better for both. Depth imports torch: build this in the scorer process
(``score.process=True``).
"""
from __future__ import annotations

import numpy as np

from jaxedit.scorers.base import check_batch
from jaxedit.scorers.simple import SimpleScorer


class SpecialistScorer:
    names = ("structural", "semantic")

    def __init__(self, structural: str = "depth", depth_weights: str = "", lam: float = 0.05,
                 canny: tuple[float, float] = (100, 200), device: str = "cpu"):
        self.simple = SimpleScorer(lam=lam)
        if structural == "depth":
            from jaxedit.scorers.depth import DepthScorer  # torch
            if not depth_weights:
                raise ValueError("structural='depth' needs depth_weights: a local Depth Anything V2 folder "
                                 "(transformers format), or 'tiny' for a small random model")
            self.structural = (DepthScorer.tiny(device=device) if depth_weights == "tiny"
                               else DepthScorer.from_pretrained(depth_weights, device=device))
        elif structural == "edges":
            from jaxedit.scorers.edges import EdgeScorer
            self.structural = EdgeScorer(*canny)
        elif structural == "sobel":
            self.structural = None
        else:
            raise ValueError(f"structural={structural!r}: expected 'depth', 'edges' or 'sobel'")

    def __call__(self, inputs, generated, styles, masks) -> dict[str, np.ndarray]:
        inputs, generated, styles, masks = check_batch(inputs, generated, styles, masks)
        out = self.simple(inputs, generated, styles, masks)
        if self.structural is not None:
            out["structural"] = self.structural.structural(inputs, generated)
        return out
