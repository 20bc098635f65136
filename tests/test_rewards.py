"""InstructRL4Pix rewards vs float64 NumPy transcriptions."""
import jax
import numpy as np

from jaxedit.rewards import attention_reward, clipped_mae, cosine, mae, mask_to_map


def _np_reward(maps, masks, x_in, x_gen, alpha, tau):
    b, hh, ww = masks.shape
    h, w = maps.shape[1:]
    a1 = masks.reshape(b, h, hh // h, w, ww // w).mean(axis=(2, 4)).reshape(b, -1)
    a2 = maps.reshape(b, -1)
    cos = (a1 * a2).sum(-1) / np.maximum(np.linalg.norm(a1, axis=-1) * np.linalg.norm(a2, axis=-1), 1e-8)
    m = (np.abs(x_in - x_gen) / 2).reshape(b, -1).mean(-1)
    return cos + alpha * m * (m > tau)


def test_attention_reward_matches_numpy():
    rng = np.random.default_rng(0)
    b = 6
    masks = (rng.uniform(size=(b, 64, 64)) > 0.6).astype(np.float64)
    masks[0] = 0.0                                        # empty mask: cos 0, no NaN
    maps = rng.uniform(size=(b, 16, 16))
    x_in = rng.uniform(-1, 1, (b, 64, 64, 3))
    x_gen = np.clip(x_in + rng.normal(0, 0.3, x_in.shape) * np.linspace(0, 1, b)[:, None, None, None], -1, 1)
    f = jax.jit(lambda *a: attention_reward(*a, alpha=-1.0, tau=0.05))
    got = np.asarray(f(*(np.float32(x) for x in (maps, masks, x_in, x_gen))))
    want = _np_reward(*(np.float32(x).astype(np.float64) for x in (maps, masks, x_in, x_gen)), -1.0, 0.05)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    m = (np.abs(x_in - x_gen) / 2).reshape(b, -1).mean(-1)
    assert (m <= 0.05).any() and (m > 0.05).any()        # both sides of the threshold are exercised
    assert got[0] == want[0] and np.isfinite(got).all()


def test_pieces():
    masks = np.zeros((1, 8, 8), np.float32)
    masks[0, :4, :4] = 1
    np.testing.assert_array_equal(np.asarray(mask_to_map(masks, (2, 2)))[0], [[1, 0], [0, 0]])
    odd = np.asarray(mask_to_map(masks, (3, 3)))          # not a divisor: antialiased resize
    assert odd.shape == (1, 3, 3) and 0 <= odd.min() and odd.max() <= 1 and odd[0, 0, 0] > odd[0, 2, 2]
    a = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    np.testing.assert_allclose(np.asarray(cosine(a, a)), [1, 1], rtol=1e-6)
    x = np.zeros((2, 4, 4, 3), np.float32)
    y = np.stack([np.full((4, 4, 3), 0.1), np.full((4, 4, 3), 1.0)]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(mae(x, y)), [0.05, 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(clipped_mae(x, y, 0.1)), [0.0, 0.5], rtol=1e-6)
