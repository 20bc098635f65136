"""Evaluation metrics (jaxedit.metrics) on real photos, against scikit-image, PyTorch and
transformers references."""
import io
import warnings

import numpy as np
import pytest
from PIL import Image
from skimage import data, filters
from skimage import metrics as skm

from jaxedit.metrics import pixel

SSIM_REF = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)


def _photos() -> np.ndarray:
    """astronaut, coffee, chelsea: uint8 (3, 150, 203, 3), an odd width on purpose."""
    return np.stack([im[:300, :406][::2, ::2] for im in (data.astronaut(), data.coffee(), data.chelsea())])


def _jpeg(im: np.ndarray, quality: int = 15) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _distorted(x: np.ndarray) -> dict[str, np.ndarray]:
    """float64 in [0, 1]: Gaussian blur, Gaussian noise, JPEG quantisation."""
    x01 = x / 255.0
    rng = np.random.default_rng(0)
    return {"blur": np.stack([filters.gaussian(im, sigma=2.0, channel_axis=-1) for im in x01]).clip(0, 1),
            "noise": (x01 + rng.normal(0, 0.08, x01.shape)).clip(0, 1),
            "jpeg": np.stack([_jpeg(im) for im in x]) / 255.0}


@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg"])
def test_pixel_metrics_match_scikit_image(kind):
    x = _photos()
    a, b = x / 255.0, _distorted(x)[kind]
    ref_ssim = [skm.structural_similarity(a[i], b[i], **SSIM_REF) for i in range(len(a))]
    ref_psnr = [skm.peak_signal_noise_ratio(a[i], b[i], data_range=1) for i in range(len(a))]
    ref_mse = [skm.mean_squared_error(a[i], b[i]) for i in range(len(a))]
    np.testing.assert_allclose(pixel.ssim(a, b), ref_ssim, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pixel.psnr(a, b), ref_psnr, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pixel.l2(a, b), ref_mse, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pixel.l1(a, b), np.abs(a - b).mean(axis=(1, 2, 3)), rtol=0, atol=1e-12)
    assert pixel.ssim(a, b).dtype == np.float64 and pixel.ssim(a, b).shape == (3,)
    # the metrics see the distortion, and (blur < noise on these photos) are not constant
    assert np.all(pixel.ssim(a, b) < 0.99) and np.ptp(pixel.ssim(a, b)) > 1e-3
    # uint8 in = the same values / 255
    b8 = np.round(b * 255).astype(np.uint8)
    np.testing.assert_allclose(pixel.ssim(x, b8), pixel.ssim(a, b8 / 255.0), atol=1e-12)
    np.testing.assert_allclose(pixel.psnr(x, b8), pixel.psnr(a, b8 / 255.0), atol=1e-12)


def test_l1_l2_are_magicbrush_torch_losses():
    """MagicBrush: nn.L1Loss / nn.MSELoss of ToTensor() images (CHW in [0, 1]), per pair."""
    torch = pytest.importorskip("torch")
    x = _photos()
    y = np.stack([_jpeg(im, 10) for im in x])
    for i in range(len(x)):
        tx, ty = (torch.from_numpy(im).permute(2, 0, 1).double() / 255.0 for im in (x[i], y[i]))
        assert pixel.l1(x[i:i + 1], y[i:i + 1])[0] == pytest.approx(torch.nn.L1Loss()(tx, ty).item(), abs=1e-12)
        assert pixel.l2(x[i:i + 1], y[i:i + 1])[0] == pytest.approx(torch.nn.MSELoss()(tx, ty).item(), abs=1e-12)


def test_identical_images_and_input_checks():
    x = _photos()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = pixel.psnr(x, x)
    assert np.all(np.isinf(p)) and np.all(p > 0)
    np.testing.assert_allclose(pixel.ssim(x, x), 1.0, atol=1e-12)
    np.testing.assert_array_equal(pixel.l1(x, x), 0.0)
    one_pixel_off = x.copy()
    one_pixel_off[0, 0, 0, 0] ^= 1
    assert np.isfinite(pixel.psnr(x, one_pixel_off)[0]) and np.isinf(pixel.psnr(x, one_pixel_off)[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixel.l2(x.astype(np.float32), x.astype(np.float32))          # 0..255 floats
    with pytest.raises(ValueError, match="differ"):
        pixel.l1(x, x[:, :-1])
    with pytest.raises(ValueError, match="11x11"):
        pixel.ssim(x[:, :10], x[:, :10])
    with pytest.raises(TypeError):
        pixel.l1(x.astype(np.int32), x.astype(np.int32))


def _mask(b: int, h: int, w: int) -> np.ndarray:
    m = np.zeros((b, h, w), np.float32)
    m[0, 40:120, 60:150] = 1
    m[1, :, 100:] = 1
    m[2, 10:20, 10:20] = 1
    return m


def test_masked_metrics_match_direct_formulas():
    x = _photos()
    a, b = x / 255.0, _distorted(x)["noise"]
    b[:, 40:120, 60:150] = 0.5                                       # an "edit"
    m = _mask(*x.shape[:3])
    out = pixel.l2_out(a, b, m)
    for i in range(3):
        keep = m[i] == 0
        assert out[i] == pytest.approx(((a[i] - b[i]) ** 2)[keep].mean(), abs=1e-12)
    # grayscale photos standing in for depth maps
    d_in, d_gen = a.mean(-1), b.mean(-1)
    np.testing.assert_allclose(pixel.depth_all(d_in, d_gen), np.abs(d_in - d_gen).mean(axis=(1, 2)), atol=1e-12)
    dout = pixel.depth_out(d_in, d_gen, m)
    for i in range(3):
        assert dout[i] == pytest.approx(np.abs(d_in[i] - d_gen[i])[m[i] == 0].mean(), abs=1e-12)
    # the edit inside the mask does not reach the *_out metrics
    b2 = b.copy()
    b2[0, 50:100, 70:140] = 1.0
    assert pixel.l2_out(a, b2, m)[0] == out[0] and pixel.l2(a, b2)[0] != pixel.l2(a, b)[0]
    # an empty mask: *_out = the whole-frame metric; a full mask: no outside pixels, NaN
    zeros, ones = np.zeros_like(m), np.ones_like(m)
    np.testing.assert_allclose(pixel.l2_out(a, b, zeros), pixel.l2(a, b), atol=1e-12)
    np.testing.assert_allclose(pixel.depth_out(d_in, d_gen, zeros), pixel.depth_all(d_in, d_gen), atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(np.isnan(pixel.l2_out(a, b, ones))) and np.all(np.isnan(pixel.depth_out(d_in, d_gen, ones)))
    # soft masks weight the outside by 1 − m; bool masks work
    soft = np.random.default_rng(1).uniform(size=m.shape)
    w = (1 - soft)[..., None]
    np.testing.assert_allclose(pixel.l2_out(a, b, soft),
                               (w * (a - b) ** 2).sum(axis=(1, 2, 3)) / (3 * w.sum(axis=(1, 2, 3))), atol=1e-12)
    np.testing.assert_array_equal(pixel.l2_out(a, b, m.astype(bool)), out)
    with pytest.raises(ValueError, match="mask"):
        pixel.l2_out(a, b, m[:, :-1])


def test_depth_all_is_the_depth_scorer_structural_score():
    pytest.importorskip("torch")
    from jaxedit.scorers.depth import DepthScorer
    s = DepthScorer.tiny()
    x = np.stack([data.astronaut()[::4, ::4][:98, :112], data.chelsea()[:98, :112]])
    gen = np.stack([_jpeg(im, 5) for im in x])
    gen[:, 30:60, 30:60] = 255 - gen[:, 30:60, 30:60]
    d_in, d_gen = s.depth(x), s.depth(gen)
    np.testing.assert_allclose(pixel.depth_all(d_in, d_gen), s.structural(x, gen), atol=1e-6)
    assert np.all(pixel.depth_all(d_in, d_gen) > 0)


# ------------------------------------------------------------------ CLIP (torch side)
@pytest.fixture(scope="module")
def clip():
    pytest.importorskip("torch")
    from jaxedit.metrics.clip_metrics import ClipMetrics
    return ClipMetrics.tiny(seed=0)


def _clip_photos() -> list[np.ndarray]:
    """Differently shaped photos, landscape and portrait."""
    return [data.astronaut()[::4, ::4], data.coffee()[::3, ::3], data.chelsea()[::3, ::3],
            np.ascontiguousarray(data.chelsea()[::3, ::3].transpose(1, 0, 2))]


def test_clip_preprocess_matches_transformers_processor():
    pytest.importorskip("torch")
    import transformers
    from jaxedit.metrics.clip_metrics import clip_preprocess
    # rocket (427x640 -> 224x335) has an odd crop margin: the half pixel goes to the right
    imgs = [data.astronaut(), data.coffee(), data.chelsea(), np.ascontiguousarray(data.chelsea().transpose(1, 0, 2)),
            data.rocket()]
    proc = transformers.CLIPImageProcessorPil()                      # CLIP's defaults: 224, bicubic, crop
    ref = proc(images=imgs, return_tensors="np")["pixel_values"]
    ours = clip_preprocess(imgs, 224)
    assert ours.shape == ref.shape == (5, 3, 224, 224)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def _reference(clip, images, captions):
    """Direct transformers computation: CLIPProcessor inputs, get_*_features, normalised."""
    import torch
    import transformers
    s = clip.size
    proc = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessorPil(size={"shortest_edge": s},
                                                           crop_size={"height": s, "width": s}),
        tokenizer=clip.tokenizer)
    inputs = proc(text=list(captions), images=list(images), return_tensors="pt", padding=True)
    with torch.inference_mode():
        ei = clip.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.double().numpy()
        et = clip.model.get_text_features(input_ids=inputs["input_ids"],
                                          attention_mask=inputs["attention_mask"]).pooler_output.double().numpy()
    return (ei / np.linalg.norm(ei, axis=-1, keepdims=True), et / np.linalg.norm(et, axis=-1, keepdims=True))


CAPTIONS = ["an astronaut in a white suit", "a cup of coffee on a saucer", "a tabby cat", "a cat, sideways"]
EDITED = ["an astronaut in the snow", "a cup of tea", "a black dog", "a cat at night"]


def test_clip_t_and_clip_i_match_transformers(clip):
    imgs = _clip_photos()
    ei, et = _reference(clip, imgs, CAPTIONS)
    np.testing.assert_allclose(clip.clip_t(imgs, CAPTIONS), (ei * et).sum(-1), rtol=0, atol=1e-5)
    other = imgs[1:] + imgs[:1]
    np.testing.assert_allclose(clip.clip_i(imgs, other), (ei * np.roll(ei, -1, axis=0)).sum(-1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(clip.clip_i(imgs, imgs), 1.0, atol=1e-6)
    # (B, H, W, 3) arrays work as lists, and batching does not change anything
    same = np.stack([im[:100, :100] for im in imgs])
    from jaxedit.metrics.clip_metrics import ClipMetrics
    small = ClipMetrics(clip.model, clip.tokenizer, batch_size=3)
    np.testing.assert_allclose(small.clip_t(same, CAPTIONS), clip.clip_t(list(same), CAPTIONS), atol=1e-6)
    with pytest.raises(ValueError, match="captions"):
        clip.clip_t(imgs, CAPTIONS[:3])
    with pytest.raises(ValueError, match="uint8"):
        clip.clip_i(same / 255.0, same / 255.0)


def test_directional_similarity_matches_numpy_formula(clip):
    imgs = _clip_photos()
    edited = [_jpeg(255 - im, 20) for im in imgs]
    ei_in, et_in = _reference(clip, imgs, CAPTIONS)
    ei_out, et_out = _reference(clip, edited, EDITED)
    di, dt = ei_out - ei_in, et_out - et_in
    ref = (di * dt).sum(-1) / (np.linalg.norm(di, axis=-1) * np.linalg.norm(dt, axis=-1))
    got = clip.directional(imgs, edited, CAPTIONS, EDITED)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.all(np.abs(got) <= 1) and np.ptp(got) > 1e-3
    # swapping both directions keeps the cosine; swapping one flips its sign
    np.testing.assert_allclose(clip.directional(edited, imgs, EDITED, CAPTIONS), got, atol=1e-6)
    np.testing.assert_allclose(clip.directional(edited, imgs, CAPTIONS, EDITED), -got, atol=1e-6)
    # no change in the image: 0, not NaN
    np.testing.assert_array_equal(clip.directional(imgs, imgs, CAPTIONS, EDITED), 0.0)


def test_sty_in_is_mean_masked_cosine_over_embedders():
    pytest.importorskip("torch")
    from jaxedit.metrics.clip_metrics import sty_in
    from jaxedit.scorers.embed import EmbeddingScorer
    embedders = [EmbeddingScorer.tiny("clip"), EmbeddingScorer.tiny("dinov2")]
    gen = np.stack([data.astronaut()[::4, ::4], data.coffee()[:384:3, 100:484:3]])
    sty = np.stack([data.rocket()[:128, :128]] * 2)
    m = np.zeros((2, 128, 128), np.float32)
    m[:, 30:100, 20:110] = 1
    got = sty_in(embedders, gen, sty, m)
    ref = []
    for e in embedders:  # direct: embed the masked generated image and the whole style image
        eg, es = e.embed(gen * m[..., None]), e.embed(sty)
        ref.append((eg * es).sum(-1) / (np.linalg.norm(eg, axis=-1) * np.linalg.norm(es, axis=-1)))
    np.testing.assert_allclose(got, np.mean(ref, axis=0), atol=1e-5)
    assert got.shape == (2,) and got.dtype == np.float64
    np.testing.assert_allclose(sty_in(embedders, sty, sty, np.ones_like(m)), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        sty_in([], gen, sty, m)
