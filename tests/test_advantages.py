"""jaxedit.rl.advantages vs float64 NumPy transcriptions; ties and Pareto cases."""
import jax
import numpy as np
import pytest

from jaxedit.rl import advantages as adv


def _np_normalize(x):
    x = np.asarray(x, np.float64)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-8)


def test_normalize_and_combined_match_numpy():
    rng = np.random.default_rng(0)
    s, m = rng.normal(3, 2, 16), rng.normal(-1, 0.01, 16)
    np.testing.assert_allclose(np.asarray(adv.normalize(s)), _np_normalize(s), rtol=1e-5, atol=1e-5)
    for alpha in (1.0, 0.3):
        got = jax.jit(adv.combined)(s, m, alpha)
        np.testing.assert_allclose(np.asarray(got), _np_normalize(s) + alpha * _np_normalize(m), atol=2e-5)
    # a constant batch: all advantages 0 (the eps keeps it finite)
    np.testing.assert_array_equal(np.asarray(adv.normalize(np.full(4, 2.5))), 0.0)


def test_pair_preference_lower_total_wins_ties_invalid():
    # pairs: (a_p, b_p) = (1, 2), (3, -1), (0.5, 0.5), (nan, 1)
    total = np.array([1.0, 3.0, 0.5, np.nan, 2.0, -1.0, 0.5, 1.0], np.float32)
    w, v = jax.jit(adv.pair_preference)(total)
    a, b = total[:4].astype(np.float64), total[4:].astype(np.float64)
    np.testing.assert_array_equal(np.asarray(v), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(w)[np.asarray(v) > 0], (a < b)[:2])
    assert w.dtype == v.dtype == np.float32
    with pytest.raises(ValueError, match="pair layout"):
        adv.pair_preference(np.zeros(5))


def test_pair_preference_random_matches_numpy():
    rng = np.random.default_rng(1)
    total = np.round(rng.normal(size=64), 1)  # coarse values: some exact ties
    w, v = adv.pair_preference(total)
    a, b = total[:32], total[32:]
    assert (a == b).any()
    np.testing.assert_array_equal(np.asarray(v), (a != b).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(w)[a != b], (a < b)[a != b])


@pytest.mark.parametrize("a,b,winner,valid", [
    ((1, 1), (2, 2), 1, 1),      # a better in both
    ((1, 2), (1, 3), 1, 1),      # equal struct, a better sem
    ((2, 2), (1, 2), 0, 1),      # b better struct, equal sem
    ((1, 3), (2, 1), None, 0),   # trade-off: invalid
    ((1, 1), (1, 1), None, 0),   # exact tie: invalid
    ((np.nan, 0), (1, 1), None, 0),
])
def test_pareto_cases(a, b, winner, valid):
    struct = np.array([a[0], b[0]], np.float32)
    sem = np.array([a[1], b[1]], np.float32)
    w, v = jax.jit(adv.pareto_preference)(struct, sem)
    assert float(v[0]) == valid
    if valid:
        assert float(w[0]) == winner


def test_pareto_random_matches_numpy_and_agrees_with_total():
    rng = np.random.default_rng(2)
    s, m = np.round(rng.normal(size=(2, 200)), 1)
    w, v = adv.pareto_preference(s, m)
    sa, sb, ma, mb = s[:100], s[100:], m[:100], m[100:]
    a_dom = (sa <= sb) & (ma <= mb) & ((sa < sb) | (ma < mb))
    b_dom = (sb <= sa) & (mb <= ma) & ((sb < sa) | (mb < ma))
    np.testing.assert_array_equal(np.asarray(v), (a_dom | b_dom).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(w), a_dom.astype(np.float32))
    # where one member dominates, the combined-advantage ranking agrees with it
    wt, vt = adv.pair_preference(adv.combined(s, m))
    ok = (np.asarray(v) > 0) & (np.asarray(vt) > 0)
    np.testing.assert_array_equal(np.asarray(wt)[ok], np.asarray(w)[ok])
