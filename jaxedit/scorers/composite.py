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

Edit masks: by default m_in is the ``masks`` the trainer passes (its mask folder, or whole-frame
masks) and the style image is used whole (m_sty = 1). With ``segment="road"`` (a text prompt), m_in
= Grounded-SAM(inputs, "road") (`segment.GroundedSamSegmenter`: Grounding DINO boxes → SAM masks)
REPLACES the passed masks in the semantic score, both its style term and its λ·pixel term (the
passed masks are then ignored); with ``segment_style=True`` (default) the style images are segmented
with the same prompt too and the style term compares against m_sty ⊙ I_sty (the paper's
f(m_sty ⊙ I_sty); for "stats", m_sty-weighted style statistics). The structural score never uses
masks. ``segment_weights``: "tiny" (small RANDOM models, tests) or "GDINO_DIR,SAM_DIR" (two local
transformers folders). An image with no box gets ``segment_fallback`` ("full": the whole frame,
"empty": zeros, which the semantic score also treats as the whole frame, "error": raise);
`stats()` returns the segmenter's counters (requests, images, cache hits/misses, fallbacks).
"""
from __future__ import annotations

import os

import numpy as np

from jaxedit.scorers.base import check_batch
from jaxedit.scorers.simple import SimpleScorer


class SpecialistScorer:
    names = ("structural", "semantic")

    def __init__(self, structural: str = "depth", depth_weights: str = "", semantic: str = "stats",
                 embed_weights: str = "", lam: float = 0.05, canny: tuple[float, float] = (100, 200),
                 device: str = "cpu", segment: str = "", segment_weights: str = "", segment_style: bool = True,
                 segment_fallback: str = "full", box_threshold: float = 0.35, text_threshold: float = 0.25):
        self.simple = SimpleScorer(lam=lam)
        self.segment, self.segment_style = segment, bool(segment_style)
        self.segmenter = (_segmenter(segment, segment_weights, segment_fallback, box_threshold, text_threshold,
                                     device) if segment else None)
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
        style_masks = None
        if self.segmenter is not None:  # m_in (and m_sty) from the prompt; the passed masks are not used
            masks = self.segmenter.masks(inputs, self.segment)
            if self.segment_style:
                style_masks = self.segmenter.masks(styles, self.segment)
        out = self.simple(inputs, generated, styles, masks, style_masks)
        if self.structural is not None:
            out["structural"] = self.structural.structural(inputs, generated)
        if self.semantic is not None:
            out["semantic"] = self.semantic(inputs, generated, styles, masks, style_masks)["semantic"]
        return out

    def stats(self) -> dict[str, int]:
        """The segmenter's counters (requests, images, hits, misses, fallbacks); {} without ``segment``."""
        return dict(self.segmenter.stats) if self.segmenter is not None else {}


def _segmenter(prompt: str, weights: str, fallback: str, box_threshold: float, text_threshold: float, device: str):
    """A GroundedSamSegmenter for ``segment=prompt``, its arguments checked before any weights load."""
    from jaxedit.scorers.segment import FALLBACKS, GroundedSamSegmenter, normalize_prompt  # torch
    normalize_prompt(prompt)  # raises on a blank prompt
    if fallback not in FALLBACKS:
        raise ValueError(f"segment_fallback={fallback!r}: expected one of {FALLBACKS}")
    kwargs = dict(fallback=fallback, box_threshold=box_threshold, text_threshold=text_threshold, device=device)
    if weights == "tiny":
        return GroundedSamSegmenter.tiny(**kwargs)
    dirs = [d.strip() for d in weights.split(",")]
    if not weights or len(dirs) != 2 or not all(dirs):
        raise ValueError(f"segment={prompt!r} needs segment_weights: 'GDINO_DIR,SAM_DIR' (a local Grounding DINO "
                         "and a local SAM/SAM2 transformers folder, comma-separated) or 'tiny' for small random "
                         f"models; got {weights!r}")
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"segment_weights: {d} is not a folder")
    return GroundedSamSegmenter.from_pretrained(*dirs, **kwargs)
