"""Text-prompted segmentation masks (Grounded-SAM): Grounding DINO boxes → SAM masks, union.

    seg = GroundedSamSegmenter.from_pretrained("/models/grounding-dino-tiny", "/models/sam-vit-base")
    m = seg.masks(images, "road")     # uint8 (B, H, W, 3) -> float32 (B, H, W) in {0, 1}

The Image-Editing Specialists paper takes its edit-region masks m_in, m_sty from Grounded-SAM(2):
Grounding DINO detects boxes for the text prompt, SAM turns each box into a mask, and the mask is
the union of those. PyTorch: imported only in the scorer process.

Pre-processing (our own, batched, on ``device``; checked against transformers' PIL processors in
``tests/test_scorers_segment.py``: each value within one uint8 level, |Δ| ≤ 1/255/std ≈ 0.0175):

- Grounding DINO (`GroundingDinoImageProcessorPil`): resized (bilinear, antialiased, then rounded
  to uint8 levels as PIL does) so that the shorter side is 800 and the longer at most 1333
  (transformers' `get_size_with_aspect_ratio`; GroundingDINO's own `RandomResize([800], 1333)` can
  differ by 1 px on the clamped side), RGB/255, ImageNet mean/std. A batch has one image
  size, so there is no padding and ``pixel_mask`` is all ones. Text as Grounded-SAM's
  `preprocess_caption`: lower-cased, stripped, a final "." added ("road" -> "road.").
- SAM (`SamImageProcessorPil`): longest side resized to the model's input size S (1024) (the other
  ``int(s·S/max + 0.5)``), same resize and normalisation, zero-padded bottom/right to S x S. Boxes
  are scaled into that frame (x·w'/W, y·h'/H, as `SamProcessor`); the 256² mask logits are
  upsampled (bilinear) to S x S, cropped to h' x w', upsampled to H x W (`post_process_masks`).
- SAM2 (`Sam2Model`; its processor needs torchvision, so only our own pre-processing, following
  the sam2 repository's `SAM2Transforms`, not checked against a processor here): resized to S x S
  without keeping the aspect ratio (bilinear, antialiased, on floats: no uint8 rounding), ImageNet
  mean/std; boxes scaled by S/W, S/H; mask logits upsampled straight to H x W
  (`SAM2ImagePredictor`, `Sam2ImageProcessor.post_process_masks`).

Thresholds (defaults of IDEA-Research's Grounded-SAM-2 `grounded_sam2_local_demo.py` and
Grounded-Segment-Anything `grounded_sam_simple_demo.py`: BOX_THRESHOLD = 0.35, TEXT_THRESHOLD =
0.25; GroundingDINO's `util.inference.Model.predict_with_caption` has the same defaults; the
older `grounded_sam_demo.py` CLI uses 0.3):

- a query is a box when its score, the max over all text tokens of sigmoid(logit), exceeds
  ``box_threshold`` (as GroundingDINO's `predict` and transformers'
  `post_process_grounded_object_detection`);
- ``text_threshold`` picks a box's label words (the prompt tokens, not [CLS]/[SEP]/"."/"?", whose
  probability exceeds it; `detect` returns them). In Grounded-SAM it never drops a box; with
  ``require_phrase=True`` a box whose label is empty is dropped;
- at most ``max_boxes`` boxes per image, highest scores first (Grounded-SAM keeps them all, as
  ``max_boxes=None`` does; the default 32 bounds the SAM decoder's work);
- SAM with ``multimask_output=False`` (one mask per box), mask = logits > 0, union over boxes.

No box in an image -> ``fallback``: "full" (the whole frame: global edits, and what the semantic
score does with an empty mask anyway), "empty" (zeros) or "error" (raises). Fallbacks are counted
in ``stats`` and logged once per ``warn_every`` fallbacks. Masks are cached (LRU, ``cache_size``
entries, bit-packed: 32 KB for 512²) by (sha1 of the image bytes and shape, prompt, thresholds):
the inputs and style images repeat every epoch.

Weights: local transformers folders, e.g. downloads of ``IDEA-Research/grounding-dino-tiny`` (model
and tokenizer) and ``facebook/sam-vit-base`` or ``facebook/sam2.1-hiera-tiny`` (the paper's
Grounded-SAM2; the kind is read from its config). ``tiny(seed)`` builds small RANDOM models.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (AutoConfig, AutoTokenizer, BertConfig, BertTokenizer, GroundingDinoConfig,
                          GroundingDinoForObjectDetection, SamConfig, SamMaskDecoderConfig, SamModel,
                          SamPromptEncoderConfig, SamVisionConfig, SwinConfig)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FALLBACKS = ("full", "empty", "error")
# Grounding DINO's text masks hard-code BERT-base-uncased ids: [CLS], [SEP], ".", "?" (and [PAD] = 0).
_TINY_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
TINY_WORDS = ("a", "the", "person", "astronaut", "flag", "face", "cup", "coffee", "plate", "road", "sky", "tree",
              "car", "red", "blue", "background")


def normalize_prompt(prompt: str) -> str:
    """Grounded-SAM's caption pre-processing: lower-case, strip, end with "."."""
    text = prompt.lower().strip()
    if not text.strip(". "):
        raise ValueError(f"empty segmentation prompt {prompt!r}")
    return text if text.endswith(".") else text + "."


def detector_size(h: int, w: int, shortest: int = 800, longest: int = 1333) -> tuple[int, int]:
    """Grounding DINO's resize target (transformers' `get_size_with_aspect_ratio`): shorter side
    `shortest`, unless that makes the longer side exceed `longest`."""
    size, raw = shortest, None
    lo, hi = float(min(h, w)), float(max(h, w))
    if hi / lo * size > longest:
        raw = longest * lo / hi
        size = int(round(raw))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return int((raw if raw is not None else size) * h / w), size
    return size, int((raw if raw is not None else size) * w / h)


def sam_size(h: int, w: int, longest: int = 1024) -> tuple[int, int]:
    """SAM's resize target: longest side `longest`, the other rounded half up (`_get_preprocess_shape`)."""
    scale = longest / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _resize_normalize(x: torch.Tensor, size: tuple[int, int], uint8_levels: bool = True) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 resized like PIL's bilinear (antialiased; rounded to uint8 levels
    as PIL's output is, unless `uint8_levels` is False), ImageNet-normalised."""
    x = x.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 255)
        x = x.round() if uint8_levels else x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def tiny_tokenizer() -> BertTokenizer:
    """A BERT WordPiece tokenizer with a 1030-token vocabulary whose special tokens sit at BERT-base's
    ids (Grounding DINO's text masks look for 101, 102, 1012, 1029) and a few words (TINY_WORDS)."""
    vocab = [f"[unused{i}]" for i in range(1030)]
    for tok, i in _TINY_SPECIAL_IDS.items():
        vocab[i] = tok
    for i, word in enumerate(TINY_WORDS):
        vocab[104 + i] = word
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(vocab) + "\n")
        return BertTokenizer(vocab=path, do_lower_case=True)


def tiny_detector_config(num_queries: int = 20) -> GroundingDinoConfig:
    """A ~0.2 M-parameter Grounding DINO: Swin backbone (transformers' own, no timm) of width 8,
    BERT text backbone of width 16, d_model 32 (GroupNorm(32)), 2 decoder layers (weight tying)."""
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7,
                          out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=1030, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    return GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                               decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                               decoder_attention_heads=2, num_queries=num_queries, max_text_len=32,
                               encoder_n_points=2, decoder_n_points=2)


def tiny_sam(kind: str = "sam", size: int = 128):
    """A small random SAM ("sam", ~30 k parameters) or SAM2 ("sam2", Hiera, ~0.1 M) at input size `size`."""
    if kind == "sam":
        return SamModel(SamConfig(
            vision_config=SamVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          output_channels=16, image_size=size, patch_size=16, global_attn_indexes=[0],
                                          mlp_dim=32, window_size=4, num_pos_feats=8),
            prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=size, patch_size=16,
                                                         mask_input_channels=4),
            mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     mlp_dim=32, iou_head_hidden_dim=16)))
    if kind == "sam2":
        from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2Model,
                                  Sam2PromptEncoderConfig, Sam2VisionConfig)
        backbone = Sam2HieraDetConfig(hidden_size=8, image_size=[size, size], blocks_per_stage=[1, 1, 2, 1],
                                      embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 2, 2],
                                      window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3],
                                      window_positional_embedding_background_size=[4, 4])
        vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                                  backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
                                  fpn_hidden_size=32)
        return Sam2Model(Sam2Config(
            vision_config=vision, prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=32, image_size=size),
            mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=32, num_hidden_layers=1,
                                                      num_attention_heads=2, iou_head_hidden_dim=16)))
    raise ValueError(f"SAM kind {kind!r}: expected 'sam' or 'sam2'")


def load_sam(path: str):
    """SamModel or Sam2Model from a local transformers folder, by its config's model_type."""
    kind = AutoConfig.from_pretrained(path).model_type
    if kind == "sam":
        return SamModel.from_pretrained(path)
    if kind in ("sam2", "sam2_video"):
        from transformers import Sam2Model
        return Sam2Model.from_pretrained(path)
    raise ValueError(f"{path}: model_type {kind!r} is not a SAM ('sam') or SAM2 ('sam2') checkpoint")


class GroundedSamSegmenter:
    """Text prompt -> binary masks: Grounding DINO boxes, SAM (or SAM2) masks, union per image."""

    def __init__(self, detector: GroundingDinoForObjectDetection, tokenizer, sam, *, box_threshold: float = 0.35,
                 text_threshold: float = 0.25, require_phrase: bool = False, max_boxes: int | None = 32,
                 fallback: str = "full", detector_sizes: tuple[int, int] = (800, 1333), batch_size: int = 4,
                 device: str = "cpu", cache_size: int = 4096, warn_every: int = 100):
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback={fallback!r}: expected one of {FALLBACKS}")
        if max_boxes is not None and max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
        self.detector = detector.to(device).eval()
        self.sam = sam.to(device).eval()
        self.tokenizer = tokenizer
        self.is_sam2 = getattr(sam.config, "model_type", "sam") != "sam"
        pe = sam.config.prompt_encoder_config.image_size
        self.sam_input = int(pe[0] if isinstance(pe, (list, tuple)) else pe)  # S: SAM's square input size
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.require_phrase, self.max_boxes, self.fallback = bool(require_phrase), max_boxes, fallback
        self.detector_sizes = tuple(detector_sizes)
        self.batch_size, self.device = int(batch_size), device
        self.cache_size, self.warn_every = int(cache_size), max(1, int(warn_every))
        self._cache: collections.OrderedDict[tuple, np.ndarray | None] = collections.OrderedDict()
        self.stats = {"requests": 0, "images": 0, "hits": 0, "misses": 0, "fallbacks": 0}
        ids = set(tokenizer.all_special_ids)
        for tok in (".", "?"):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is not None and i != tokenizer.unk_token_id:
                ids.add(i)
        self._non_phrase_ids = torch.tensor(sorted(ids), dtype=torch.long)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, grounding_dino_dir: str, sam_dir: str, **kwargs) -> "GroundedSamSegmenter":
        """Grounding DINO (model + tokenizer) and SAM/SAM2 from local transformers folders."""
        return cls(GroundingDinoForObjectDetection.from_pretrained(grounding_dino_dir),
                   AutoTokenizer.from_pretrained(grounding_dino_dir), load_sam(sam_dir), **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, *, sam: str = "sam", sam_input: int = 128, **kwargs) -> "GroundedSamSegmenter":
        """Small RANDOM models (detector at 96–160 px, SAM at `sam_input`²) for tests: the boxes they
        find are arbitrary."""
        torch.manual_seed(seed)
        detector = GroundingDinoForObjectDetection(tiny_detector_config())
        return cls(detector, tiny_tokenizer(), tiny_sam(sam, sam_input), **{"detector_sizes": (96, 160), **kwargs})

    def save_pretrained(self, grounding_dino_dir: str, sam_dir: str) -> None:
        self.detector.save_pretrained(grounding_dino_dir)
        self.tokenizer.save_pretrained(grounding_dino_dir)
        self.sam.save_pretrained(sam_dir)

    # ----------------------------------------------------------------------------------- pre-processing
    def detector_inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> Grounding DINO pixel_values float32 (B, 3, h, w)."""
        b, h, w, _ = images.shape
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        return _resize_normalize(x, detector_size(h, w, *self.detector_sizes))

    def sam_inputs(self, images: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 (B, H, W, 3) -> (SAM pixel_values float32 (B, 3, S, S), (h', w') the unpadded size)."""
        b, h, w, _ = images.shape
        s = self.sam_input
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        if self.is_sam2:
            return _resize_normalize(x, (s, s), uint8_levels=False), (s, s)
        nh, nw = sam_size(h, w, s)
        return F.pad(_resize_normalize(x, (nh, nw)), (0, s - nw, 0, s - nh)), (nh, nw)

    def _text_inputs(self, text: str, batch: int) -> dict[str, torch.Tensor]:
        tok = self.tokenizer([text], return_tensors="pt", truncation=True,
                             max_length=self.detector.config.max_text_len)
        return {"input_ids": tok["input_ids"].expand(batch, -1).to(self.device),
                "attention_mask": tok["attention_mask"].expand(batch, -1).to(self.device),
                "token_type_ids": torch.zeros_like(tok["input_ids"]).expand(batch, -1).to(self.device)}

    # ---------------------------------------------------------------------------------------- detection
    @torch.inference_mode()
    def _detect_batch(self, images: np.ndarray, text: str) -> list[dict]:
        b, h, w, _ = images.shape
        pixel_values = self.detector_inputs(images)
        txt = self._text_inputs(text, b)
        out = self.detector(pixel_values=pixel_values, pixel_mask=torch.ones_like(pixel_values[:, 0], dtype=torch.long),
                            **txt)
        n_tok = txt["input_ids"].shape[1]
        probs = out.logits[..., :n_tok].float().sigmoid().cpu()  # (b, Q, L); beyond the text: -inf -> 0
        scores = probs.max(-1).values  # over all tokens, [CLS]/[SEP]/"." included (as GroundingDINO's predict)
        ids = txt["input_ids"][0].cpu()
        phrase_tok = ~torch.isin(ids, self._non_phrase_ids)  # (L,)
        cx, cy, bw, bh = out.pred_boxes.float().cpu().unbind(-1)  # relative to the (unpadded) image
        boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        results = []
        for i in range(b):
            words = (probs[i] > self.text_threshold) & phrase_tok  # (Q, L)
            keep = scores[i] > self.box_threshold
            if self.require_phrase:
                keep &= words.any(-1)
            idx = torch.nonzero(keep)[:, 0]
            idx = idx[torch.argsort(scores[i, idx], descending=True, stable=True)][:self.max_boxes]
            results.append({
                "boxes": boxes[i, idx].numpy().astype(np.float32),
                "scores": scores[i, idx].numpy().astype(np.float32),
                "labels": [self.tokenizer.decode(ids[words[q]].tolist()) for q in idx.tolist()]})
        return results

    def detect(self, images: np.ndarray, prompt: str) -> list[dict]:
        """Grounding DINO boxes per image after the thresholds: [{"boxes": float32 (n, 4) x0 y0 x1 y1 in
        image pixels, "scores": float32 (n,), "labels": [str] (the words above text_threshold)}]."""
        images, text = _check_images(images), normalize_prompt(prompt)
        return [r for i in range(0, len(images), self.batch_size)
                for r in self._detect_batch(images[i:i + self.batch_size], text)]

    # ------------------------------------------------------------------------------------- segmentation
    @torch.inference_mode()
    def segment(self, images: np.ndarray, boxes: list[np.ndarray]) -> np.ndarray:
        """Union of SAM's masks of each image's boxes (x0 y0 x1 y1, image pixels): float32 (B, H, W)
        in {0, 1}; an image without boxes gets zeros. SAM's image encoder runs in batches of
        ``batch_size`` over the images that have boxes."""
        images = _check_images(images)
        b, h, w, _ = images.shape
        if len(boxes) != b:
            raise ValueError(f"{len(boxes)} box lists for {b} images")
        out = np.zeros((b, h, w), np.float32)
        todo = [i for i in range(b) if len(boxes[i])]
        s = self.sam_input
        for c in range(0, len(todo), self.batch_size):
            chunk = todo[c:c + self.batch_size]
            pixel_values, (nh, nw) = self.sam_inputs(images[chunk])
            emb = self.sam.get_image_embeddings(pixel_values)
            scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
            for j, i in enumerate(chunk):
                bx = (torch.as_tensor(np.asarray(boxes[i], np.float32)).reshape(-1, 4) * scale)[None].to(self.device)
                e = [x[j:j + 1] for x in emb] if isinstance(emb, (list, tuple)) else emb[j:j + 1]
                logits = self.sam(image_embeddings=e, input_boxes=bx, multimask_output=False).pred_masks[0, :, :1]
                union = torch.zeros((h, w), dtype=torch.bool, device=logits.device)
                for k in range(0, len(logits), 8):  # (n, 1, 256, 256) logits, 8 boxes at a time
                    m = logits[k:k + 8].float()
                    if not self.is_sam2:  # to the padded S x S input, crop the padding
                        m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False)[..., :nh, :nw]
                    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                    union |= (m[:, 0] > 0).any(0)
                out[i] = union.cpu().numpy()
        return out

    # ---------------------------------------------------------------------------------------- the masks
    def _key(self, image: np.ndarray, text: str) -> tuple:
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes())
        digest.update(str(image.shape).encode())
        return digest.digest(), text, self.box_threshold, self.text_threshold, self.require_phrase, self.max_boxes

    def masks(self, images: np.ndarray, prompt: str) -> np.ndarray:
        """uint8 (B, H, W, 3) -> float32 (B, H, W) in {0, 1}: the union of the SAM masks of the boxes
        Grounding DINO finds for `prompt`; an image without a box gets the fallback."""
        images, text = _check_images(images), normalize_prompt(prompt)
        b, h, w, _ = images.shape
        self.stats["requests"] += 1
        self.stats["images"] += b
        keys = [self._key(im, text) for im in images]
        found: dict[tuple, np.ndarray | None] = {}
        missing: dict[tuple, int] = {}  # new key -> first index (pair layouts repeat each input)
        for i, k in enumerate(keys):
            if k in self._cache:
                found[k] = self._cache[k]
            elif k not in found:
                missing.setdefault(k, i)
        self.stats["misses"] += len(missing)
        self.stats["hits"] += b - len(missing)
        idx = list(missing.values())
        for c in range(0, len(idx), self.batch_size):
            chunk = images[idx[c:c + self.batch_size]]
            dets = self._detect_batch(chunk, text)
            seg = self.segment(chunk, [d["boxes"] for d in dets])
            for i, d, m in zip(idx[c:c + self.batch_size], dets, seg):
                k = keys[i]
                found[k] = np.packbits(m.astype(bool)) if len(d["boxes"]) else None
        for k in keys:  # LRU: insert / refresh, then evict the oldest
            self._cache[k] = found[k]
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        out = np.empty((b, h, w), np.float32)
        empty = 0
        for i, k in enumerate(keys):
            if found[k] is None:
                empty += 1
                out[i] = 1.0 if self.fallback == "full" else 0.0
            else:
                out[i] = np.unpackbits(found[k], count=h * w).reshape(h, w)
        if empty:
            self._fallback(empty, b, prompt)
        return out

    def _fallback(self, n: int, b: int, prompt: str) -> None:
        before = self.stats["fallbacks"]
        self.stats["fallbacks"] += n
        if self.fallback == "error":
            raise RuntimeError(
                f"Grounding DINO found no box for prompt {prompt!r} in {n} of {b} images (box_threshold="
                f"{self.box_threshold}, require_phrase={self.require_phrase}); use fallback='full' or 'empty', "
                "a lower box_threshold, or another prompt")
        if before == 0 or before // self.warn_every != self.stats["fallbacks"] // self.warn_every:
            logger.warning("no box for prompt %r in %d of %d images of this request (box_threshold=%s); "
                           "using the %r fallback (%d fallbacks in %d images so far; logged every %d)",
                           prompt, n, b, self.box_threshold, self.fallback, self.stats["fallbacks"],
                           self.stats["images"], self.warn_every)

    __call__ = masks


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    return images
