"""Text-prompted segmentation (Grounding DINO boxes -> SAM masks) with tiny RANDOM models on real photos
from scikit-image: save/load round trip, pre-processing against transformers' PIL processors, the whole
pipeline against transformers' reference post-processing, thresholds / box frame / union / fallback with
a scripted detector and a box-painting SAM, and the cache."""
import logging
import types

import numpy as np
import pytest
from skimage import data

torch = pytest.importorskip("torch")
from transformers import (GroundingDinoImageProcessorPil, GroundingDinoProcessor, SamImageProcessorPil,  # noqa: E402
                          SamProcessor)

from jaxedit.scorers.segment import GroundedSamSegmenter  # noqa: E402



pytestmark = pytest.mark.usefixtures("torch_one_thread")


LEVEL = 1 / 255 / 0.224  # one uint8 step after ImageNet normalisation (largest: smallest std)


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_tiny_round_trip_shapes_and_values(tmp_path):
    seg = GroundedSamSegmenter.tiny(0, max_boxes=4)
    seg.save_pretrained(str(tmp_path / "gdino"), str(tmp_path / "sam"))
    re = GroundedSamSegmenter.from_pretrained(str(tmp_path / "gdino"), str(tmp_path / "sam"),
                                              detector_sizes=(96, 160), max_boxes=4)
    a = np.stack([data.astronaut(), data.astronaut()[:, ::-1]])  # 512 x 512
    m = re.masks(a, "astronaut")
    assert m.shape == (2, 512, 512) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_array_equal(m, seg.masks(a, "astronaut"))  # the weights and tokenizer came back
    c = re.masks(data.coffee()[None], "Cup")  # 400 x 600
    assert c.shape == (1, 400, 600) and set(np.unique(c)) <= {0.0, 1.0}
    assert re.stats["fallbacks"] == 0 and 0.0 < m.mean() < 1.0  # real detections, not a fallback frame

    s2 = GroundedSamSegmenter.tiny(1, sam="sam2", max_boxes=2)
    s2.save_pretrained(str(tmp_path / "gdino2"), str(tmp_path / "sam2"))
    r2 = GroundedSamSegmenter.from_pretrained(str(tmp_path / "gdino2"), str(tmp_path / "sam2"),
                                              detector_sizes=(96, 160), max_boxes=2)
    assert r2.is_sam2 and type(r2.sam).__name__ == "Sam2Model"
    x = a[:1, ::2, ::2]
    np.testing.assert_array_equal(r2.masks(x, "astronaut"), s2.masks(x, "astronaut"))


@pytest.mark.parametrize("image", ["astronaut", "coffee", "astronaut_1024", "wide_300x512"])
def test_preprocessing_matches_transformers_pil_processors(image):
    im = {"astronaut": data.astronaut, "coffee": data.coffee,
          "astronaut_1024": lambda: np.repeat(np.repeat(data.astronaut(), 2, 0), 2, 1),  # DINO downscales
          "wide_300x512": lambda: data.astronaut()[:300]}[image]()  # longest side clamped at 1333
    seg = GroundedSamSegmenter.tiny(detector_sizes=(800, 1333))
    seg.sam_input = 1024  # SAM's real input size (the tiny SAM runs at 128)
    ref = GroundingDinoImageProcessorPil()(images=[im], return_tensors="pt")
    mine = seg.detector_inputs(im[None])
    assert mine.shape == ref["pixel_values"].shape and ref["pixel_mask"].all()  # no padding: one size per batch
    d = (mine - ref["pixel_values"]).abs()
    assert d.max() <= LEVEL + 1e-4 and d.mean() < 0.006, (d.max(), d.mean())  # PIL's uint8 rounding

    ref = SamImageProcessorPil()(images=[im], return_tensors="pt")
    mine, reshaped = seg.sam_inputs(im[None])
    assert mine.shape == ref["pixel_values"].shape == (1, 3, 1024, 1024)
    assert list(reshaped) == ref["reshaped_input_sizes"][0].tolist()
    d = (mine - ref["pixel_values"]).abs()
    assert d.max() <= LEVEL + 1e-4 and d.mean() < 0.006, (d.max(), d.mean())
    assert (mine[..., reshaped[0]:, :] == 0).all() and (mine[..., reshaped[1]:] == 0).all()  # zero padding


def test_pipeline_matches_transformers_reference_post_processing():
    """Same pixel inputs (the processors'), then: our thresholds, box scaling, SAM call, mask upsampling
    and union == transformers' post_process_grounded_object_detection -> SamProcessor boxes ->
    SamModel -> post_process_masks -> any."""
    seg = GroundedSamSegmenter.tiny(2, max_boxes=None)
    gp = GroundingDinoProcessor(GroundingDinoImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 160}),
                                seg.tokenizer)
    sip = SamImageProcessorPil(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    sp = SamProcessor(sip)
    seg.detector_inputs = lambda images: gp.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def sam_inputs(images):
        o = sip(images=list(images), return_tensors="pt")
        return o["pixel_values"], tuple(o["reshaped_input_sizes"][0].tolist())
    seg.sam_inputs = sam_inputs
    for im in (data.coffee(),):  # not square: SAM's padding and crop
        inp = gp(images=[im], text="a cup.", return_tensors="pt")
        with torch.inference_mode():
            out = seg.detector(**inp)
        r = gp.post_process_grounded_object_detection(out, inp["input_ids"], threshold=0.35, text_threshold=0.25,
                                                      target_sizes=[im.shape[:2]])[0]
        assert len(r["boxes"]) > 1
        det = seg.detect(im[None], "A cup")[0]
        order = np.argsort(-r["scores"].numpy(), kind="stable")
        np.testing.assert_allclose(det["scores"], r["scores"].numpy()[order], rtol=1e-5)
        np.testing.assert_allclose(det["boxes"], r["boxes"].numpy()[order], rtol=1e-5, atol=1e-3)
        si = sp(images=[im], input_boxes=[r["boxes"].tolist()], return_tensors="pt")
        with torch.inference_mode():
            pm = seg.sam(pixel_values=si["pixel_values"], input_boxes=si["input_boxes"].float(),
                         multimask_output=False).pred_masks
        ref = sip.post_process_masks(pm, si["original_sizes"], si["reshaped_input_sizes"],
                                     pad_size={"height": 128, "width": 128})[0][:, 0].any(0).numpy()
        mine = seg.masks(im[None], "a cup")[0]
        assert 0 < ref.mean() < 1
        assert (mine.astype(bool) != ref).mean() < 1e-4  # float noise at the 0-crossings only


# A scripted detector for the prompt "cup." = [CLS] cup . [SEP]: per query (token probabilities, box cxcywh).
QUERIES = [({1: 0.9}, (0.30, 0.40, 0.20, 0.30)),     # kept, best
           ({1: 0.36}, (0.70, 0.70, 0.20, 0.20)),    # kept: just above box_threshold 0.35
           ({1: 0.34}, (0.50, 0.10, 0.30, 0.10)),    # dropped: below box_threshold
           ({2: 0.6, 1: 0.1}, (0.80, 0.20, 0.10, 0.20)),  # kept on "." alone (label empty): require_phrase drops it
           ({1: 0.8}, (0.40, 0.45, 0.30, 0.20))]     # kept, overlaps the first


def _script_detector(seg, monkeypatch, queries_per_image):
    def forward(pixel_values, input_ids, **kw):
        b, n_tok, t = pixel_values.shape[0], input_ids.shape[1], seg.detector.config.max_text_len
        q = max(len(x) for x in queries_per_image)
        logits = torch.full((b, q, t), -float("inf"))
        logits[:, :, :n_tok] = -20.0
        boxes = torch.full((b, q, 4), 0.5)
        for i in range(b):
            for j, (probs, box) in enumerate(queries_per_image[i]):
                for tok, p in probs.items():
                    logits[i, j, tok] = _logit(p)
                boxes[i, j] = torch.tensor(box)
        return types.SimpleNamespace(logits=logits, pred_boxes=boxes)
    monkeypatch.setattr(seg.detector, "forward", forward)


def _paint_sam(seg, monkeypatch):
    """SAM stand-in: mask logits +10 inside each prompt box (in SAM's S x S input frame), -10 outside,
    at SAM's low resolution S/4; records the boxes it receives."""
    received = []
    s = seg.sam_input

    def forward(image_embeddings, input_boxes, multimask_output):
        assert multimask_output is False
        received.append(input_boxes[0].clone())
        low = s // 4
        c = (torch.arange(low) + 0.5) * s / low
        x0, y0, x1, y1 = input_boxes[0].unbind(-1)
        inside = ((c[None, None, :] >= x0[:, None, None]) & (c[None, None, :] < x1[:, None, None])
                  & (c[None, :, None] >= y0[:, None, None]) & (c[None, :, None] < y1[:, None, None]))
        return types.SimpleNamespace(pred_masks=torch.where(inside, 10.0, -10.0)[None, :, None])
    monkeypatch.setattr(seg.sam, "forward", forward)
    monkeypatch.setattr(seg.sam, "get_image_embeddings",
                        lambda pv: [torch.zeros(len(pv), 1)] if seg.is_sam2 else torch.zeros(len(pv), 1))
    return received


def _box_pixels(boxes_xyxy, h, w, grow):
    yy, xx = np.mgrid[:h, :w] + 0.5
    out = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes_xyxy:
        out |= (xx >= x0 - grow) & (xx < x1 + grow) & (yy >= y0 - grow) & (yy < y1 + grow)
    return out


@pytest.mark.parametrize("kind", ["sam", "sam2"])
def test_thresholds_box_frame_union_and_fallback(kind, monkeypatch):
    seg = GroundedSamSegmenter.tiny(sam=kind, sam_input=1024)  # SAM's real 1024 frame (model faked below)
    assert seg.sam_input == 1024
    c = data.coffee()  # 400 x 600
    images = np.stack([c, c[::-1]])
    _script_detector(seg, monkeypatch, [QUERIES, [({1: 0.2}, (0.5, 0.5, 0.5, 0.5))]])
    received = _paint_sam(seg, monkeypatch)

    det = seg.detect(images, "Cup")
    expect_order = [0, 4, 3, 1]  # score > 0.35, highest first
    np.testing.assert_allclose(det[0]["scores"], [0.9, 0.8, 0.6, 0.36], atol=1e-6)
    cxcywh = np.array([QUERIES[q][1] for q in expect_order])
    xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
    xyxy = xyxy * [600, 400, 600, 400]  # image pixels
    np.testing.assert_allclose(det[0]["boxes"], xyxy, rtol=1e-5)
    assert det[0]["labels"] == ["cup", "cup", "", "cup"] and len(det[1]["boxes"]) == 0

    m = seg.masks(images, "cup")
    # SAM got the boxes in its input frame: SAM scales x by 1024/600 and y by 683/400 (longest side 1024,
    # 400·1024/600 = 682.7 -> 683, then padded to 1024²); SAM2 resizes to 1024² (x·1024/600, y·1024/400).
    frame = [1024 / 600, 683 / 400] if kind == "sam" else [1024 / 600, 1024 / 400]
    assert len(received) == 1  # image 1 had no box: SAM not run for it
    np.testing.assert_allclose(received[0].numpy(), xyxy * (frame * 2), rtol=1e-5)
    mask = m[0].astype(bool)
    assert mask[_box_pixels(xyxy, 400, 600, grow=-3)].all()  # union of the boxes, up to 3 px at the edges
    assert not mask[~_box_pixels(xyxy, 400, 600, grow=3)].any()
    assert abs(mask.mean() - _box_pixels(xyxy, 400, 600, 0).mean()) < 0.01
    assert (m[1] == 1).all() and seg.stats["fallbacks"] == 1  # no box: whole frame

    seg.fallback = "empty"  # applied when served, so cached results follow it
    assert (seg.masks(images[1:], "cup") == 0).all() and seg.stats["fallbacks"] == 2
    seg.fallback = "error"
    with pytest.raises(RuntimeError, match="no box for prompt 'cup' in 1 of 2 images"):
        seg.masks(images, "cup")

    seg.fallback, seg.require_phrase = "full", True
    det = seg.detect(images[:1], "cup")[0]
    np.testing.assert_allclose(det["scores"], [0.9, 0.8, 0.36], atol=1e-6)  # the "."-only box is gone
    seg.require_phrase, seg.max_boxes = False, 2
    received.clear()
    m2 = seg.masks(images[:1], "cup")[0].astype(bool)  # a new cache key (max_boxes): runs again
    np.testing.assert_allclose(received[0].numpy(), xyxy[:2] * (frame * 2), rtol=1e-5)
    assert not m2[~_box_pixels(xyxy[:2], 400, 600, grow=3)].any() and m2.sum() < mask.sum()


def test_cache_counts_model_calls_and_is_bounded():
    seg = GroundedSamSegmenter.tiny(0, max_boxes=2, cache_size=3)
    calls = {"detector": 0, "sam": 0}
    det_forward, sam_embed = seg.detector.forward, seg.sam.get_image_embeddings

    def count_det(*a, **k):
        calls["detector"] += 1
        return det_forward(*a, **k)

    def count_sam(*a, **k):
        calls["sam"] += 1
        return sam_embed(*a, **k)
    seg.detector.forward, seg.sam.get_image_embeddings = count_det, count_sam
    a = data.astronaut()[::4, ::4]
    b, c = a[:, ::-1], 255 - a
    x = np.stack([a, b, a, b])  # pair layout repeats each input: 2 unique images, one model batch
    m1 = seg.masks(x, "astronaut")
    assert calls == {"detector": 1, "sam": 1} and seg.stats["misses"] == 2 and seg.stats["hits"] == 2
    np.testing.assert_array_equal(m1[:2], m1[2:])
    m2 = seg.masks(x, "astronaut")
    assert calls == {"detector": 1, "sam": 1} and seg.stats["hits"] == 6  # no model call
    np.testing.assert_array_equal(m1, m2)
    seg.masks(x[:2], "flag")  # another prompt: a miss
    assert calls["detector"] == 2 and seg.stats["misses"] == 4 and len(seg._cache) == 3  # LRU bound
    seg.batch_size = 1
    seg.masks(np.stack([c, b]), "flag")  # (b, flag) cached; c new -> one batch of one
    assert calls["detector"] == 3 and seg.stats["misses"] == 5
    seg.masks(x[:1], "astronaut")  # (a, astronaut) was evicted
    assert calls["detector"] == 4 and seg.stats == {"requests": 5, "images": 13, "hits": 7, "misses": 6,
                                                    "fallbacks": 0}


def test_fallback_warnings_are_rate_limited_and_inputs_checked(monkeypatch, caplog):
    seg = GroundedSamSegmenter.tiny(warn_every=3)
    _script_detector(seg, monkeypatch, [[({1: 0.1}, (0.5, 0.5, 0.2, 0.2))]] * 2)
    x = data.astronaut()[None, ::8, ::8]
    with caplog.at_level(logging.WARNING, logger="jaxedit.scorers.segment"):
        for _ in range(6):
            assert (seg.masks(x, "cup") == 1).all()
    assert seg.stats["fallbacks"] == 6 and seg.stats["hits"] == 5
    assert len([r for r in caplog.records if "no box for prompt" in r.getMessage()]) == 3  # at 1, 3, 6
    with pytest.raises(ValueError, match="uint8"):
        seg.masks(x.astype(np.float32), "cup")
    with pytest.raises(ValueError, match="empty segmentation prompt"):
        seg.masks(x, " . ")
    with pytest.raises(ValueError, match="fallback"):
        GroundedSamSegmenter.tiny(fallback="none")
