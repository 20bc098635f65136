"""Images/s of each PyTorch scorer at real size (random weights) on this machine.

    python bench/scorers.py            # batch 8, 256x256 generated images (the paper's 256 px edits)

Models, built from the real architectures' configs with random weights (nothing downloaded):

- ``depth``: Depth Anything V2 Small (DINOv2-S/14 backbone, 24.8 M params), 518-px input, as
  `jaxedit.scorers.depth.DepthScorer` (the structural score runs it on input AND generated image:
  its images/s here counts images through the model);
- ``clip``: CLIP ViT-B/16 vision tower + projection (86 M), 224 px, `embed.EmbeddingScorer`;
- ``dinov2``: DINOv2 ViT-B/14 (86 M), 224 px, `embed.EmbeddingScorer`;
- ``dreamsim``: DreamSim = DINO + CLIP + OpenCLIP ViT-B/16 (3 x 86 M), 224 px (PIL resize),
  `embed.EmbeddingScorer` over `dreamsim.DreamSim.random()` (the real configs);
- ``segment``: Grounded-SAM, `segment.GroundedSamSegmenter` with Grounding DINO at its default
  (grounding-dino-tiny) config (Swin-T + BERT-base, 900 queries, 800-px shorter side) and SAM
  ViT-B (1024 px), prompt "road", cache off (every call recomputes); random weights find
  arbitrary boxes (up to 32 per image go through SAM);
- ``edges``: Canny (OpenCV), for scale.

torch threads = cores, ``torch.inference_mode``. Writes ``bench/results/scorers.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from unet_forward import machine_facts  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "scorers.json")


def build(name: str):
    """-> (callable images -> anything, parameter count)."""
    import torch
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, DepthAnythingConfig,
                              DepthAnythingForDepthEstimation, Dinov2Config, Dinov2Model)
    from jaxedit.scorers.depth import DepthScorer
    from jaxedit.scorers.edges import canny
    from jaxedit.scorers.embed import EmbeddingScorer
    torch.manual_seed(0)
    if name == "edges":
        return canny, 0
    if name == "segment":
        from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, SamConfig, SamModel
        from jaxedit.scorers.segment import GroundedSamSegmenter, tiny_tokenizer
        seg = GroundedSamSegmenter(GroundingDinoForObjectDetection(GroundingDinoConfig()), tiny_tokenizer(),
                                   SamModel(SamConfig()), cache_size=0)
        n = sum(p.numel() for m in (seg.detector, seg.sam) for p in m.parameters())
        return (lambda images: seg.masks(images, "road")), n
    if name == "depth":
        backbone = Dinov2Config(hidden_size=384, num_attention_heads=6, num_hidden_layers=12, patch_size=14,
                                image_size=518, out_indices=[3, 6, 9, 12], reshape_hidden_states=False)
        model = DepthAnythingForDepthEstimation(DepthAnythingConfig(backbone_config=backbone))
        scorer = DepthScorer(model, size=518)
        return scorer.depth, sum(p.numel() for p in model.parameters())
    if name == "clip":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=768, intermediate_size=3072,
                                                               num_hidden_layers=12, num_attention_heads=12,
                                                               image_size=224, patch_size=16, projection_dim=512))
    elif name == "dreamsim":
        from jaxedit.scorers.dreamsim import DreamSim
        model = DreamSim.random()
    elif name == "dinov2":
        model = Dinov2Model(Dinov2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, image_size=518, patch_size=14))
    else:
        raise ValueError(name)
    scorer = EmbeddingScorer(model, name, size=224)  # DreamSim: its own 224
    return scorer.embed, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorers", default="edges,depth,clip,dinov2,dreamsim,segment")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count())
    images = np.random.default_rng(0).integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8)
    results = []
    for name in a.scorers.split(","):
        fn, params = build(name)
        fn(images)  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn(images)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results.append({"scorer": name, "params_m": round(params / 1e6, 1), "batch": a.batch, "size": a.size,
                        "median_s": round(med, 3), "images_per_s": round(a.batch / med, 2),
                        "load": round(os.getloadavg()[0], 2)})
        print(json.dumps(results[-1]), flush=True)
    doc = {"bench": "scorers", "torch_threads": torch.get_num_threads(), "machine": machine_facts(),
           "results": results}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
