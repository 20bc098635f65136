"""The Specialists scorer: a structural score of choice + the semantic score, one request.

    SpecialistScorer(structural="depth", depth_weights="/models/depth-anything-v2-small-hf")

structural: "depth" (Depth Anything V2, `depth.DepthScorer`; ``depth_weights`` a local
transformers-format folder, or "tiny" for a small RANDOM model in tests), "edges" (Canny,
`edges.EdgeScorer`) or "sobel" (the weight-free Sobel score of `simple.SimpleScorer`).
semantic: "stats" (the weight-free masked colour/texture statistics + λ·pixel term of
`simple.SimpleScorer`) or "clip" / "dinov2" / "dreamsim" (`embed.EmbeddingScorer`: embedding
cosine distance of the masked edit to the style image + the same λ·pixel term; ``embed_weights``
a local transformers folder, for "dreamsim" DreamSim's checkpoint folder (see
`dreamsim.DreamSim.from_original`), or "tiny"). Lower is better for both. Depth and embeddings import torch:
build this in the scorer process (``score.process=True``).
"""
from __future__ import annotations

import numpy as np

from jaxedit.scorers.base import check_batch
from jaxedit.scorers.simple import SimpleScorer


class SpecialistScorer:
    names = ("structural", "semantic")

    def __init__(self, structural: str = "depth", depth_weights: str = "", semantic: str = "stats",
                 embed_weights: str = "", lam: float = 0.05, canny: tuple[float, float] = (100, 200),
                 device: str = "cpu"):
        self.simple = SimpleScorer(lam=lam)
        if semantic == "stats":
            self.semantic = None
        elif semantic in ("clip", "dinov2", "dreamsim"):
            from jaxedit.scorers.embed import EmbeddingScorer  # torch
            if not embed_weights:
                raise ValueError(f"semantic={semantic!r} needs embed_weights: a local transformers folder "
                                 "of the encoder (DreamSim: its checkpoint folder), or 'tiny' for a small "
                                 "random model")
            self.semantic = (EmbeddingScorer.tiny(semantic, lam=lam, device=device) if embed_weights == "tiny"
                             else EmbeddingScorer.from_pretrained(embed_weights, semantic, lam=lam, device=device))
        else:
            raise ValueError(f"semantic={semantic!r}: expected 'stats', 'clip', 'dinov2' or 'dreamsim'")
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
        if self.semantic is not None:
            out["semantic"] = self.semantic(inputs, generated, styles, masks)["semantic"]
        return out
