"""SpecialistScorer with text-prompted segmentation (``segment=...``): m_in (and m_sty) from the
segmenter replace the passed masks in the semantic score; without ``segment`` nothing changes."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxedit.scorers.composite import SpecialistScorer  # noqa: E402
from jaxedit.scorers.embed import EmbeddingScorer  # noqa: E402
from jaxedit.scorers.simple import SimpleScorer, _stats, grayscale, sobel_edges  # noqa: E402

B, H, W, HS, WS = 3, 32, 40, 36, 28  # style images of another size: the fake masks tell them apart


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8)
    sty = rng.integers(0, 256, (B, HS, WS, 3), dtype=np.uint8)
    sty[:, :HS // 2] //= 3  # a dark top half: the style term depends on where m_sty is
    masks = (rng.random((B, H, W)) > 0.5).astype(np.float32)
    return x, gen, sty, masks


def _rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape[:3], np.float32)
    m[:, y0:y1, x0:x1] = 1
    return m


M_IN = _rect((B, H, W), 4, 20, 10, 30)
M_STY = _rect((B, HS, WS), 20, 34, 2, 20)


def _fake_masks(scorer, monkeypatch):
    calls = []

    def masks(images, prompt):
        calls.append((images.shape, prompt))
        return {(H, W): M_IN, (HS, WS): M_STY}[images.shape[1:3]].copy()

    monkeypatch.setattr(scorer.segmenter, "masks", masks)
    return calls


def _pixel(x, gen, m, lam=0.05):
    return lam * ((1.0 - m)[..., None] * (x / 255.0 - gen / 255.0) ** 2).mean(axis=(1, 2, 3))


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_segment_masks_replace_passed_masks(kind, monkeypatch):
    x, gen, sty, masks = _batch()
    sc = SpecialistScorer(structural="sobel", semantic=kind, embed_weights="tiny", segment="road",
                          segment_weights="tiny")
    calls = _fake_masks(sc, monkeypatch)
    out = sc(x, gen, sty, masks)
    assert calls == [((B, H, W, 3), "road"), ((B, HS, WS, 3), "road")]
    # by hand: cosdist(f(m_in ⊙ I_gen), f(m_sty ⊙ I_sty)) + λ·pixel term with m_in
    ref = EmbeddingScorer.tiny(kind)
    e_gen = ref.embed(gen.astype(np.float32) * M_IN[..., None])
    e_sty = ref.embed(sty.astype(np.float32) * M_STY[..., None])
    want = 1.0 - (e_gen * e_sty).sum(-1) + _pixel(x, gen, M_IN)
    np.testing.assert_allclose(out["semantic"], want, rtol=1e-5, atol=1e-6)
    # the passed masks are ignored
    for other in (np.zeros_like(masks), np.ones_like(masks), 1 - masks):
        np.testing.assert_array_equal(sc(x, gen, sty, other)["semantic"], out["semantic"])
    # ... while they do matter without segmentation, and m_sty matters
    plain = SpecialistScorer(structural="sobel", semantic=kind, embed_weights="tiny")
    assert not np.allclose(plain(x, gen, sty, masks)["semantic"], out["semantic"], atol=1e-4)
    whole = ref(x, gen, sty, M_IN)["semantic"]  # style used whole
    assert np.abs(whole - out["semantic"]).max() > 1e-4
    # segment_style=False: the style image whole, only m_in from the segmenter
    sc2 = SpecialistScorer(structural="sobel", semantic=kind, embed_weights="tiny", segment="road",
                           segment_weights="tiny", segment_style=False)
    calls2 = _fake_masks(sc2, monkeypatch)
    np.testing.assert_allclose(sc2(x, gen, sty, masks)["semantic"], whole, rtol=1e-6, atol=1e-7)
    assert calls2 == [((B, H, W, 3), "road")]
    # structural: unchanged by segmentation
    np.testing.assert_array_equal(out["structural"], plain(x, gen, sty, masks)["structural"])


def test_segment_with_stats_semantic_and_edges_structural(monkeypatch):
    x, gen, sty, masks = _batch(1)
    sc = SpecialistScorer(structural="edges", semantic="stats", segment="road", segment_weights="tiny")
    _fake_masks(sc, monkeypatch)
    out = sc(x, gen, sty, masks)
    # by hand: m_in-weighted statistics of I_gen vs m_sty-weighted statistics of I_sty, λ·pixel with m_in
    xg, xs = gen / 255.0, sty / 255.0
    mg, sg, tg = _stats(xg, sobel_edges(grayscale(gen)), M_IN.astype(np.float64))
    ms, ss, ts = _stats(xs, sobel_edges(grayscale(sty)), M_STY.astype(np.float64))
    d = (np.abs(mg - ms).mean(-1) + 2 * np.abs(sg - ss).mean(-1) + np.abs(tg - ts)) / 3
    np.testing.assert_allclose(out["semantic"], d + _pixel(x, gen, M_IN), rtol=1e-6)
    np.testing.assert_array_equal(sc(x, gen, sty, 1 - masks)["semantic"], out["semantic"])
    whole = SimpleScorer()(x, gen, sty, M_IN)["semantic"]
    assert np.abs(whole - out["semantic"]).max() > 1e-3
    sc2 = SpecialistScorer(structural="edges", semantic="stats", segment="road", segment_weights="tiny",
                           segment_style=False)
    _fake_masks(sc2, monkeypatch)
    np.testing.assert_array_equal(sc2(x, gen, sty, masks)["semantic"], whole)
    plain = SpecialistScorer(structural="edges", semantic="stats")
    np.testing.assert_array_equal(out["structural"], plain(x, gen, sty, masks)["structural"])


def test_without_segment_is_unchanged():
    x, gen, sty, masks = _batch(2)
    masks[0] = 0  # a zero-area mask: the whole frame
    for kind in ("stats", "clip"):
        sc = SpecialistScorer(structural="sobel", semantic=kind, embed_weights="tiny")
        assert sc.segmenter is None and sc.stats() == {}
        out = sc(x, gen, sty, masks)
        simple = SimpleScorer()(x, gen, sty, masks)
        np.testing.assert_array_equal(out["structural"], simple["structural"])
        want = simple["semantic"] if kind == "stats" else EmbeddingScorer.tiny(kind)(x, gen, sty, masks)["semantic"]
        np.testing.assert_array_equal(out["semantic"], want)
    # the new style_masks arguments: None is the old path; all-ones and zero-area masks are the whole style
    ref = EmbeddingScorer.tiny("clip")
    d0 = ref.style_distance(gen, sty, masks)
    for ms in (None, np.ones((B, HS, WS), np.float32), np.zeros((B, HS, WS), np.float32)):
        np.testing.assert_array_equal(ref.style_distance(gen, sty, masks, ms), d0)
        np.testing.assert_array_equal(SimpleScorer()(x, gen, sty, masks, ms)["semantic"],
                                      SimpleScorer()(x, gen, sty, masks)["semantic"])
    with pytest.raises(ValueError, match="style_masks"):
        ref.style_distance(gen, sty, masks, np.ones((B, H, W), np.float32))
    with pytest.raises(ValueError, match="style_masks"):
        SimpleScorer()(x, gen, sty, masks, np.ones((B, H, W), np.float32))


def test_segment_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="segment_weights"):
        SpecialistScorer(structural="sobel", segment="road")
    for bad in ("onlyone", "a,b,c", ",b", "a,", " , "):
        with pytest.raises(ValueError, match="GDINO_DIR,SAM_DIR"):
            SpecialistScorer(structural="sobel", segment="road", segment_weights=bad)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        SpecialistScorer(structural="sobel", segment="road", segment_weights=f"{tmp_path},{tmp_path}/nope")
    with pytest.raises(ValueError, match="segment_fallback"):
        SpecialistScorer(structural="sobel", segment="road", segment_weights="tiny", segment_fallback="none")
    with pytest.raises(ValueError, match="empty segmentation prompt"):
        SpecialistScorer(structural="sobel", segment=" . ", segment_weights="tiny")


@pytest.mark.parametrize("fallback", ["full", "empty"])
def test_fallback_counter_after_empty_detection(fallback, monkeypatch):
    x, gen, sty, masks = _batch(3)
    sc = SpecialistScorer(structural="sobel", semantic="stats", segment="road", segment_weights="tiny",
                          segment_fallback=fallback, box_threshold=0.5, text_threshold=0.3)
    assert (sc.segmenter.box_threshold, sc.segmenter.text_threshold, sc.segmenter.fallback) == (0.5, 0.3, fallback)
    none = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32), "labels": []}
    monkeypatch.setattr(sc.segmenter, "_detect_batch", lambda images, text: [dict(none) for _ in images])
    out = sc(x, gen, sty, masks)
    st = sc.stats()
    assert st["fallbacks"] == 2 * B and st["images"] == 2 * B and st["requests"] == 2
    # no box: the whole frame ("empty" masks have zero area, which the semantic score takes as the whole frame)
    ones = np.ones((B, H, W), np.float32)
    np.testing.assert_array_equal(out["semantic"], SimpleScorer()(x, gen, sty, ones)["semantic"])
    sc(x, gen, sty, masks)  # cached: counted again, no new detection
    assert sc.stats()["fallbacks"] == 4 * B and sc.stats()["hits"] == 2 * B
    st["fallbacks"] = -1  # a copy
    assert sc.stats()["fallbacks"] == 4 * B


def test_real_tiny_segmenter_end_to_end():
    x, gen, sty, masks = _batch(4)
    sc = SpecialistScorer(structural="sobel", semantic="clip", embed_weights="tiny", segment="road",
                          segment_weights="tiny", box_threshold=0.0)  # random tiny models: keep every box
    out = sc(x, gen, sty, masks)
    m_in, m_sty = sc.segmenter.masks(x, "road"), sc.segmenter.masks(sty, "road")  # cached: the same masks
    assert m_in.shape == (B, H, W) and m_sty.shape == (B, HS, WS) and sc.stats()["hits"] == 2 * B
    want = EmbeddingScorer.tiny("clip")(x, gen, sty, m_in, m_sty)["semantic"]
    np.testing.assert_array_equal(out["semantic"], want)
    assert np.isfinite(out["semantic"]).all() and out["structural"].shape == (B,)
