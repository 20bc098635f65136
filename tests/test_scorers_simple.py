"""Scoring interface and the weight-free scorer: formulas vs direct float64 loops, sanity, imports."""
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from jaxedit.data.scenes import road_scene, style_image
from jaxedit.scorers import available_scorers, check_scores, make_scorer, register_scorer
from jaxedit.scorers.base import check_batch
from jaxedit.scorers.simple import SimpleScorer, semantic_terms, sobel_edges, structural_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(b=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    pairs = [road_scene((seed, i), size) for i in range(b)]
    inputs = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs]).astype(np.float32)
    generated = np.clip(inputs.astype(int) + rng.integers(-40, 41, inputs.shape), 0, 255).astype(np.uint8)
    styles = np.stack([style_image("snow", (seed, i), size + 8) for i in range(b)])   # other size
    return inputs, generated, styles, masks


# --- direct per-sample float64 references (scipy / explicit formulas) ------------------------

def _edges_ref(img):
    g = (0.299 * img[..., 0].astype(np.float64) + 0.587 * img[..., 1] + 0.114 * img[..., 2]) / 255.0
    gx, gy = ndimage.sobel(g, axis=1, mode="nearest"), ndimage.sobel(g, axis=0, mode="nearest")
    return np.sqrt(gx ** 2 + gy ** 2) / (4 * np.sqrt(2))


def _wstats(x, w):
    mean = np.array([np.average(x[..., c], weights=w) for c in range(3)])
    std = np.array([np.sqrt(np.average((x[..., c] - mean[c]) ** 2, weights=w)) for c in range(3)])
    return mean, std


def _semantic_ref(inp, gen, sty, m, lam=0.05):
    m = m.astype(np.float64)
    if m.sum() == 0:
        m = np.ones_like(m)
    xi, xg, xs = inp / 255.0, gen / 255.0, sty / 255.0
    mg, sg = _wstats(xg, m)
    ms, ss = _wstats(xs, np.ones(xs.shape[:2]))
    tg = np.average(_edges_ref(gen), weights=m)
    ts = _edges_ref(sty).mean()
    d = (np.abs(mg - ms).mean() + 2 * np.abs(sg - ss).mean() + abs(tg - ts)) / 3
    pixel = 0.0
    for c in range(3):
        pixel += np.sum((1 - m) * (xi[..., c] - xg[..., c]) ** 2)
    return d, lam * pixel / (m.size * 3)


# --- formulas --------------------------------------------------------------------------------

def test_sobel_matches_scipy_and_is_in_unit_range():
    inputs, generated, _, _ = _batch()
    gray = inputs.astype(np.float64) @ [0.299, 0.587, 0.114] / 255.0
    e = sobel_edges(gray)
    for i in range(len(inputs)):
        np.testing.assert_allclose(e[i], _edges_ref(inputs[i]), rtol=0, atol=1e-12)
    step = np.zeros((1, 6, 6))
    step[:, :, 3:] = 1.0
    check = np.indices((1, 6, 6)).sum(0) % 2.0
    assert sobel_edges(step).max() == pytest.approx(1 / np.sqrt(2)) and 0 <= sobel_edges(check).max() <= 1


def test_structural_matches_direct_computation():
    inputs, generated, styles, masks = _batch()
    got = SimpleScorer()(inputs, generated, styles, masks)["structural"]
    ref = [np.abs(_edges_ref(a) - _edges_ref(b)).mean() for a, b in zip(inputs, generated)]
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(structural_score(inputs, generated), ref, rtol=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_semantic_matches_direct_computation(soft):
    inputs, generated, styles, masks = _batch(seed=3)
    if soft:
        masks = np.clip(ndimage.uniform_filter(masks, size=(1, 5, 5)), 0, 1)   # soft masks are weights
    masks[1] = 0.0                                                            # zero-area: whole frame
    scorer = SimpleScorer(components=True)
    out = scorer(inputs, generated, styles, masks)
    assert scorer.names == ("structural", "semantic", "semantic_style", "semantic_pixel")
    assert set(out) == set(scorer.names) and all(v.dtype == np.float32 for v in out.values())
    refs = np.array([_semantic_ref(*args) for args in zip(inputs, generated, styles, masks)])
    d, p = semantic_terms(inputs, generated, styles, masks)
    np.testing.assert_allclose(d, refs[:, 0], rtol=1e-10)
    np.testing.assert_allclose(p, refs[:, 1], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(out["semantic"], refs.sum(1), rtol=1e-6)
    assert out["semantic_pixel"][1] == 0                                    # whole frame: nothing outside


def test_empty_mask_policies_and_options():
    inputs, generated, styles, masks = _batch()
    masks[0] = 0.0
    d, p = semantic_terms(inputs, generated, styles, masks, empty_mask="no_style")
    assert d[0] == 0 and p[0] == pytest.approx(0.05 * ((inputs[0] / 255.0 - generated[0] / 255.0) ** 2).mean())
    _, p2 = semantic_terms(inputs, generated, styles, masks, lam=0.1)
    np.testing.assert_allclose(p2[1:], 2 * p[1:])
    d_tex, _ = semantic_terms(inputs, generated, styles, masks, weights=(0, 0, 1))
    ref = [abs(np.average(_edges_ref(g), weights=m if m.sum() else None) - _edges_ref(s).mean())
           for g, s, m in zip(generated, styles, masks)]
    np.testing.assert_allclose(d_tex, ref, rtol=1e-10)
    with pytest.raises(ValueError, match="empty_mask"):
        SimpleScorer(empty_mask="zero")


def test_chunking_does_not_change_scores():
    args = _batch(b=5)
    a, b = SimpleScorer(chunk=1)(*args), SimpleScorer(chunk=16)(*args)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# --- sanity: lower is better -----------------------------------------------------------------

def test_closer_to_the_style_inside_the_mask_scores_lower():
    inputs, _, styles, masks = _batch(b=3, seed=5)
    styles = styles[:, :32, :32]
    m = masks[..., None]
    pasted = np.where(m > 0, styles, inputs).astype(np.uint8)          # the style texture on the road
    scorer = SimpleScorer()
    assert (scorer(inputs, pasted, styles, masks)["semantic"] < scorer(inputs, inputs, styles, masks)["semantic"]).all()
    # monotone along a blend towards a flat style colour
    flat = np.broadcast_to(np.array([230, 235, 250], np.uint8), inputs.shape).copy()
    scores = []
    for a in (0.0, 0.3, 0.6, 0.9, 1.0):
        gen = np.where(m > 0, (1 - a) * inputs + a * flat, inputs)
        scores.append(scorer(inputs, np.round(gen).astype(np.uint8), flat, masks)["semantic"])
    assert (np.diff(np.array(scores), axis=0) < 0).all()


def test_changes_outside_the_mask_raise_the_semantic_score():
    inputs, _, styles, masks = _batch(b=3, seed=6)
    far = ndimage.binary_dilation(masks > 0, iterations=2, structure=np.ones((1, 3, 3)))
    rng = np.random.default_rng(0)
    noisy = np.where(far[..., None], inputs, rng.integers(0, 256, inputs.shape)).astype(np.uint8)
    scorer = SimpleScorer(components=True)
    base, changed = scorer(inputs, inputs, styles, masks), scorer(inputs, noisy, styles, masks)
    np.testing.assert_array_equal(base["semantic_style"], changed["semantic_style"])   # mask region untouched
    assert (changed["semantic"] > base["semantic"]).all() and (changed["semantic_pixel"] > 0).all()
    inside = np.where(masks[..., None] > 0, rng.integers(0, 256, inputs.shape), inputs).astype(np.uint8)
    assert (scorer(inputs, inside, styles, masks)["semantic_pixel"] == 0).all()    # inside changes are free


def test_blur_and_shift_raise_the_structural_score():
    inputs, _, styles, masks = _batch(b=3, seed=7)
    scorer = SimpleScorer()
    s = lambda g: scorer(inputs, g.astype(np.uint8), styles, masks)["structural"]  # noqa: E731
    blur1 = ndimage.gaussian_filter(inputs.astype(float), (0, 1, 1, 0))
    blur2 = ndimage.gaussian_filter(inputs.astype(float), (0, 2.5, 2.5, 0))
    shift1, shift3 = np.roll(inputs, 1, axis=2), np.roll(inputs, 3, axis=2)
    assert (s(inputs) == 0).all()
    assert (0 < s(np.round(blur1))).all() and (s(np.round(blur1)) < s(np.round(blur2))).all()
    assert (0 < s(shift1)).all() and (s(shift1) < s(shift3)).all()


# --- interface -------------------------------------------------------------------------------

def test_registry_and_checks():
    assert "simple" in available_scorers()
    scorer = make_scorer("simple", lam=0.1)
    assert isinstance(scorer, SimpleScorer) and scorer.lam == 0.1 and scorer.names == ("structural", "semantic")
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*simple"):
        make_scorer("nope")
    register_scorer("test_lazy", "jaxedit.scorers.simple:SimpleScorer")
    assert isinstance(make_scorer("test_lazy"), SimpleScorer)
    assert isinstance(make_scorer("jaxedit.scorers.simple:SimpleScorer", lam=0.2), SimpleScorer)  # unregistered target
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("simple", lambda: None)
    inputs, generated, styles, masks = _batch(b=2)
    out = scorer(inputs, generated, styles, masks)
    check_scores(out, scorer.names, 2)
    with pytest.raises(ValueError, match="finite"):
        check_scores({**out, "semantic": np.array([np.nan, 1.0])}, scorer.names, 2)
    with pytest.raises(ValueError, match="uint8"):
        check_batch(inputs.astype(np.float32), generated, styles, masks)
    with pytest.raises(ValueError, match="masks must be"):
        check_batch(inputs, generated, styles, masks[:, :-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_batch(inputs, generated, styles, masks * 2)


def test_scorer_modules_import_neither_jax_nor_torch():
    code = ("import sys, numpy as np\n"
            "import jaxedit.scorers, jaxedit.scorers.base, jaxedit.scorers.simple\n"
            "from jaxedit.scorers import make_scorer\n"
            "s = make_scorer('simple')\n"
            "x = np.zeros((1, 8, 8, 3), np.uint8)\n"
            "s(x, x, x, np.ones((1, 8, 8), np.float32))\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'torch', 'flax'))\n"
            "print('IMPORTED', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout, out.stdout
