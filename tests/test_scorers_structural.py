"""Structural scorers on real photos bundled with scikit-image: Canny edges (OpenCV) and Depth
Anything V2 (tiny random config; the pre-processing checked against transformers' processor)."""
import numpy as np
import pytest
from skimage import data

from jaxedit.scorers.edges import EdgeScorer, canny


def _shifted(images, k):
    return np.roll(images, k, axis=2)


def test_canny_maps_and_edge_score():
    a = data.astronaut()[None]
    e = canny(a)
    assert e.shape == (1, 512, 512) and set(np.unique(e)) == {0.0, 1.0}
    assert abs(e.mean() - 0.0784) < 0.002  # OpenCV (100, 200) on this photo (NOTES-ON-THE-STACK: 0.079)
    s = EdgeScorer()
    scores = [float(s.structural(a, _shifted(a, k))[0]) for k in (0, 1, 4, 32)]
    assert scores[0] == 0.0 and scores == sorted(scores) and scores[1] > 0.05
    masks = np.ones((1, 512, 512), np.float32)
    assert s(a, a, a, masks)["structural"].shape == (1,)
    with pytest.raises(ValueError, match="low <= high"):
        EdgeScorer(200, 100)
    with pytest.raises(ValueError, match="uint8"):
        canny(a.astype(np.float32))


def test_depth_scorer_tiny():
    pytest.importorskip("torch")
    from jaxedit.scorers.depth import DepthScorer
    s = DepthScorer.tiny()
    a = np.stack([data.astronaut(), data.astronaut()[:, ::-1]])
    d = s.depth(a)
    assert d.shape == (2, 512, 512) and d.dtype == np.float32
    np.testing.assert_allclose(d.reshape(2, -1).min(1), 0.0)
    np.testing.assert_allclose(d.reshape(2, -1).max(1), 1.0)
    assert s.structural(a, a).tolist() == [0.0, 0.0]
    assert (s.structural(a, _shifted(a, 16)) > s.structural(a, _shifted(a, 2))).all()
    assert (s.structural(a, _shifted(a, 2)) > 0).all()
    c = data.coffee()[None]  # 400x600: not square, not a multiple of 14
    assert s.depth(c).shape == (1, 400, 600)
    assert s.depth(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 32, 32)


def test_depth_cache_of_inputs():
    pytest.importorskip("torch")
    from jaxedit.scorers.depth import DepthScorer
    s = DepthScorer.tiny(cache_size=3)
    calls = []
    depth = s.depth
    s.depth = lambda images: calls.append(len(images)) or depth(images)
    a = data.astronaut()[None, ::4, ::4]
    b, c, d = a[:, ::-1], a[:, :, ::-1], 255 - a
    x = np.concatenate([a, b, a, b])  # pair layout repeats each input
    np.testing.assert_allclose(s.depth_cached(x), depth(x), atol=1e-5)  # (batch composition: float noise)
    assert calls == [2]
    np.testing.assert_allclose(s.depth_cached(np.concatenate([b, c])), depth(np.concatenate([b, c])), atol=1e-5)
    assert calls == [2, 1] and len(s._cache) == 3
    s.depth_cached(d)  # evicts the least recently used (a)
    assert calls == [2, 1, 1] and len(s._cache) == 3
    s.depth_cached(a)
    assert calls == [2, 1, 1, 1]


def test_depth_preprocessing_matches_transformers_processor():
    """Same resized size as transformers' DPT processor (keep aspect, multiples of 14), and the
    same depth up to the resampling filter (PIL's bicubic there, torch's antialiased bicubic here)."""
    torch = pytest.importorskip("torch")
    from transformers import DPTImageProcessorPil  # the PIL backend: no torchvision
    from jaxedit.scorers import depth
    s = depth.DepthScorer.tiny()
    proc = DPTImageProcessorPil(size={"height": 98, "width": 98}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                resample=3, image_mean=list(depth.IMAGENET_MEAN), image_std=list(depth.IMAGENET_STD))
    for img in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()):
        pv = proc(images=img, return_tensors="pt")["pixel_values"]
        assert tuple(pv.shape[2:]) == depth._target_size(*img.shape[:2], 98), img.shape
        with torch.inference_mode():
            ref = s.model(pixel_values=pv).predicted_depth[:, None]
        ref = torch.nn.functional.interpolate(ref, size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        ref = ((ref - ref.min()) / (ref.max() - ref.min())).numpy()
        ours = s.depth(img[None])[0]
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.98 and np.abs(ours - ref).mean() < 0.03


def test_specialist_scorer_combines_structural_and_semantic():
    from jaxedit.scorers import make_scorer
    from jaxedit.scorers.simple import SimpleScorer
    rng = np.random.default_rng(0)
    a = data.astronaut()[None, ::4, ::4].repeat(2, 0)
    g = np.stack([np.roll(a[0], 3, axis=1), a[1] // 2])
    sty, masks = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8), (rng.uniform(size=(2, 128, 128)) > 0.5)
    masks = masks.astype(np.float32)
    simple = SimpleScorer(lam=0.05)(a, g, sty, masks)
    np.testing.assert_array_equal(make_scorer("specialist", structural="sobel")(a, g, sty, masks)["structural"],
                                  simple["structural"])
    edges = make_scorer("specialist", structural="edges")(a, g, sty, masks)
    np.testing.assert_array_equal(edges["structural"], EdgeScorer().structural(a, g))
    np.testing.assert_array_equal(edges["semantic"], simple["semantic"])
    pytest.importorskip("torch")
    from jaxedit.scorers.depth import DepthScorer
    depth = make_scorer("specialist", structural="depth", depth_weights="tiny")(a, g, sty, masks)
    np.testing.assert_array_equal(depth["structural"], DepthScorer.tiny().structural(a, g))
    from jaxedit.scorers.embed import EmbeddingScorer
    clip = make_scorer("specialist", structural="edges", semantic="clip", embed_weights="tiny")(a, g, sty, masks)
    np.testing.assert_array_equal(clip["semantic"], EmbeddingScorer.tiny("clip")(a, g, sty, masks)["semantic"])
    np.testing.assert_array_equal(clip["structural"], edges["structural"])
    with pytest.raises(ValueError, match="needs embed_weights"):
        make_scorer("specialist", structural="sobel", semantic="dinov2")
    with pytest.raises(ValueError, match="needs depth_weights"):
        make_scorer("specialist", structural="depth")
    with pytest.raises(ValueError, match="expected 'depth', 'edges' or 'sobel'"):
        make_scorer("specialist", structural="midas")
