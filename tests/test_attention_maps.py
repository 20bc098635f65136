"""Cross-attention maps reduced inside the compiled sampler (InstructRL4Pix a_2) vs a per-step
host-side recomputation from the U-Net's sown probabilities; recording does not change samples."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.diffusion import IP2PCond, sample
from jaxedit.diffusion.attention_maps import instruction_token_weights, reduce_maps
from jaxedit.models.attention import ATTENTION_PROBS
from jaxedit.pipeline import EditPipeline

S, B, HW = 3, 2, 8  # steps, images, latent side


@pytest.fixture(scope="module")
def run(tiny_checkpoint):
    pipe = EditPipeline.from_pretrained(tiny_checkpoint)
    prompts = ["add a red car", "make the road white with fresh snow"]
    k = jax.random.split(jax.random.key(0), 3)
    cond = IP2PCond(jax.random.normal(k[0], (B, HW, HW, 4)), pipe.encode_text(prompts), pipe.encode_text([""])[0])
    weights = jnp.asarray(pipe.instruction_token_weights(prompts))
    x_T = jax.random.normal(k[1], (B, HW, HW, 4))
    kw = dict(steps=S, eta=1.0, return_trajectory=True)
    plain = sample(pipe.denoise, pipe.denoiser_params, cond, pipe.schedule, x_T, k[2], **kw)
    recorded = sample(pipe.attention_denoiser(1), pipe.denoiser_params, (cond, weights), pipe.schedule, x_T, k[2],
                      aux=True, **kw)
    return pipe, prompts, cond, weights, plain, recorded


def test_token_weights_cover_the_instruction_tokens_only(run):
    pipe, prompts, *_ = run
    w = pipe.instruction_token_weights(prompts + [""])
    for row, p in zip(w, prompts + [""]):
        n = len(pipe.tokenizer(p).input_ids) - 2          # without start and end
        assert n > 0 or p == ""
        np.testing.assert_allclose(row[1:n + 1], 1.0 / max(n, 1))
        assert row[0] == 0 and not row[n + 1:].any()
    assert instruction_token_weights([100], 10)[0, 1:9].sum() == pytest.approx(1.0)  # truncated at 77 - 2


def test_recording_leaves_samples_unchanged(run):
    *_, plain, recorded = run
    np.testing.assert_array_equal(np.asarray(recorded[0]), np.asarray(plain[0]))
    np.testing.assert_array_equal(np.asarray(recorded[1].log_prob), np.asarray(plain[1].log_prob))


def test_maps_equal_host_side_recomputation(run):
    """Per step: the U-Net on the recorded x_t's guidance rows, probabilities of every
    cross-attention layer at full latent resolution, fully conditioned rows, token-weighted
    (float64 NumPy), averaged over layers and steps."""
    pipe, _, cond, weights, _, (x0, traj, maps) = run
    apply = jax.jit(lambda p, *a: pipe.unet.apply({"params": p}, *a, mutable=[ATTENTION_PROBS]))
    from jaxedit.diffusion.guidance import ip2p_rows
    want = np.zeros((B, HW * HW))
    w = np.asarray(weights, np.float64)
    for s in range(S):
        model_in, context = ip2p_rows(traj.x_t[s], cond.image_latents, cond.text_emb, cond.uncond_emb)
        _, sown = apply(pipe.denoiser_params, model_in, jnp.full((3 * B,), traj.t[s]), context)
        layers = [np.asarray(p, np.float64) for p in jax.tree_util.tree_leaves(sown[ATTENTION_PROBS])
                  if p.shape[1] == HW * HW]
        assert len(layers) == 3  # the tiny U-Net: down_blocks.0 (1 layer), up_blocks.1 (2) at 8x8
        want += np.mean([np.einsum("bnl,bl->bn", p[2 * B:], w) for p in layers], axis=0) / S
    assert maps.shape == (B, HW, HW)
    np.testing.assert_allclose(np.asarray(maps).reshape(B, -1), want, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(maps) > 0)


def test_reduce_maps_names_the_available_resolutions():
    sown = {"a": (jnp.ones((6, 64, 77)),), "b": (jnp.ones((6, 16, 77)),)}
    w = jnp.ones((2, 77)) / 77
    assert reduce_maps(sown, w, (8, 8), 2).shape == (2, 4, 4)
    with pytest.raises(ValueError, match=r"no cross-attention layer at 2x2.*\[16, 64\]"):
        reduce_maps(sown, w, (8, 8), 4)
    with pytest.raises(ValueError, match="not a multiple"):
        reduce_maps(sown, w, (8, 6), 4)
