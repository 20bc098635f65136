"""Embedding semantic score (CLIP, DINOv2; tiny random configs) on real photos."""
import numpy as np
import pytest
from skimage import data

torch = pytest.importorskip("torch")
from jaxedit.scorers.embed import NORMALISATION, EmbeddingScorer  # noqa: E402


def _images():
    a = data.astronaut()[None, ::4, ::4]                       # 128x128
    c = data.coffee()[None, :384:3, 100:484:3]                 # 128x128
    return np.concatenate([a, c])


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_embeddings_match_transformers_processor_and_model(kind):
    """At the model's own size (no resize), our normalisation and output = transformers' processor
    (PIL backend, resize/crop off) + the model's image features."""
    import transformers
    s = EmbeddingScorer.tiny(kind)
    img = np.stack([data.astronaut()[::8, ::8][:56, :56], data.chelsea()[:56, :56]])
    mean, std = NORMALISATION[kind]
    proc_cls = transformers.CLIPImageProcessorPil if kind == "clip" else transformers.BitImageProcessorPil
    proc = proc_cls(do_resize=False, do_center_crop=False, do_convert_rgb=True, image_mean=list(mean),
                    image_std=list(std))
    pv = proc(images=list(img), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = s.model(pixel_values=pv)
        ref = (out.image_embeds if kind == "clip" else out.pooler_output).numpy()
    ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(s.embed(img), ref, atol=2e-5)


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_semantic_score_masking(kind):
    s = EmbeddingScorer.tiny(kind, lam=0.05)
    x = _images()
    sty = np.stack([data.rocket()[:200, :300]] * 2)
    m = np.zeros((2, 128, 128), np.float32)
    m[:, 40:100, 30:90] = 1
    gen = x.copy()
    gen[:, 60:80, 50:70] = 255 - gen[:, 60:80, 50:70]          # an edit inside the mask
    d0 = s.style_distance(gen, sty, m)
    outside = gen.copy()
    outside[:, :20] = 0                                        # changes outside the mask only
    np.testing.assert_array_equal(s.style_distance(outside, sty, m), d0)
    inside = gen.copy()
    inside[:, 45:95, 35:85] = 0
    assert (s.style_distance(inside, sty, m) != d0).all()
    # The pixel term sees exactly the outside change: λ·mean((1−m)(I_in − I_gen)²).
    full = s(x, outside, sty, m)["semantic"]
    x01, o01 = x / 255.0, outside / 255.0
    pixel = 0.05 * ((1 - m)[..., None] * (x01 - o01) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(full, d0 + pixel, rtol=1e-6)
    assert np.all((0 <= d0) & (d0 <= 2))
    # identical generated and style image: distance 0; an empty mask means the whole frame
    np.testing.assert_allclose(s.style_distance(sty, sty, np.ones((2, 200, 300), np.float32)), 0, atol=1e-6)
    np.testing.assert_allclose(s.style_distance(sty, sty, np.zeros((2, 200, 300), np.float32)), 0, atol=1e-6)
