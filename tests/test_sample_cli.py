"""`python -m jaxedit.sample`: folder mode, resume, iterative edits, bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxedit import sample
from jaxedit.data import images as imio


def _write(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    _write(str(tmp_path / "in" / "a.png"), rng.integers(0, 255, (64, 64, 3), np.uint8))
    _write(str(tmp_path / "in" / "b_gray.png"), rng.integers(0, 255, (64, 64), np.uint8))
    _write(str(tmp_path / "in" / "c_rgba_odd.png"), rng.integers(0, 255, (61, 70, 4), np.uint8))
    Image.fromarray(rng.integers(0, 65535, (64, 64), np.uint16)).save(tmp_path / "in" / "d16.png")
    (tmp_path / "in" / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_mode_resumes_and_reports(folder, tiny_checkpoint):
    logs = []
    out = str(folder / "out")
    kw = dict(steps=2, sampler="ddim", batch_size=2, log=logs.append, progress_bar=False)
    counts = sample.run(tiny_checkpoint, str(folder / "in"), ["make it snow", "make it night"], out, **kw)
    assert counts == {"written": 4, "skipped": 0, "failed": 1}
    assert sorted(os.listdir(out)) == ["a.png", "b_gray.png", "c_rgba_odd.png", "d16.png"]  # no temp files left
    text = "\n".join(logs)
    assert "converted L image" in text and "converted RGBA image" in text and "converted I;16 image" in text
    assert "70x61 is not a multiple of 8; resized to 64x56" in text
    assert "cannot read image" in text and "e_corrupt.png" in text
    assert Image.open(os.path.join(out, "c_rgba_odd.png")).size == (64, 56)
    first = np.asarray(Image.open(os.path.join(out, "a.png")))
    # A killed run resumes: remove one output, run again, only it is redone (deterministically).
    os.remove(os.path.join(out, "a.png"))
    logs.clear()
    counts = sample.run(tiny_checkpoint, str(folder / "in"), ["make it snow", "make it night"], out, **kw)
    assert counts == {"written": 1, "skipped": 3, "failed": 1}
    # Same noise (per-image keys); batch size 1 vs 2 may move a pixel by one level through float rounding.
    again = np.asarray(Image.open(os.path.join(out, "a.png"))).astype(int)
    assert np.abs(again - first).max() <= 1 and np.mean(again != first) < 0.05


def test_iterative_edits_apply_in_order(folder, tiny_checkpoint):
    kw = dict(steps=2, sampler="ddim", progress_bar=False, log=lambda s: None)
    src = str(folder / "in" / "a.png")
    sample.run(tiny_checkpoint, src, ["make it snow"], str(folder / "one.png"), **kw)
    sample.run(tiny_checkpoint, str(folder / "one.png"), ["make it night"], str(folder / "two_steps.png"),
               seed=1000, **kw)  # the second edit of a chained run uses seed + 1000
    sample.run(tiny_checkpoint, src, ["make it snow", "make it night"], str(folder / "chained.png"), **kw)
    np.testing.assert_array_equal(imio.read_image(str(folder / "chained.png")),
                                  imio.read_image(str(folder / "two_steps.png")))


@pytest.mark.parametrize("args, message", [
    (dict(image="missing.png"), "image not found: .*missing.png"),
    (dict(instructions=[" "]), "non-empty --instruction"),
    (dict(sampler="plms"), "unknown sampler 'plms'"),
    (dict(style=["s1.png", "s2.png"]), "2 style images for 1 input images"),
    (dict(out="out.gif"), "unsupported output extension"),
])
def test_bad_arguments_are_one_line_errors(folder, tiny_checkpoint, args, message):
    kw = dict(image=str(folder / "in" / "a.png"), instructions=["x"], out=str(folder / "o.png"))
    kw.update(args)
    if args.get("image") == "missing.png":
        kw["image"] = str(folder / "missing.png")
    with pytest.raises(sample.UsageError, match=message):
        sample.run(tiny_checkpoint, kw.pop("image"), kw.pop("instructions"), kw.pop("out"), progress_bar=False, **kw)
    assert not os.path.exists(folder / "o.png")


def test_style_given_to_plain_model_is_refused(folder, tiny_checkpoint):
    with pytest.raises(sample.UsageError, match="takes no style images"):
        sample.run(tiny_checkpoint, str(folder / "in" / "a.png"), ["x"], str(folder / "o.png"),
                   style=[str(folder / "in" / "a.png")], progress_bar=False)


def test_command_line_exit_codes(folder, tmp_path):
    cmd = [sys.executable, "-m", "jaxedit.sample", "--checkpoint", str(tmp_path / "nope"),
           "--image", str(folder / "in" / "a.png"), "--instruction", "x", "--out", str(tmp_path / "o.png")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 1 and "checkpoint folder not found" in r.stderr.strip().splitlines()[-1]
    r = subprocess.run(cmd[:-2], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --out is required"
