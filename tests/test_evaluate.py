"""`python -m jaxedit.evaluate`: resumable edits and metrics, metrics.csv / table.md / report.html,
sweeps and trade-off plots, the MagicBrush protocol, and the jax / torch process split."""
import csv
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from jaxedit import evaluate
from jaxedit.data import images as imio
from jaxedit.data.scenes import road_edit, road_scene, write_dataset
from jaxedit.metrics import compute, pixel, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("scenes")), 20, n_styles=3, size=64)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    from jaxedit.models.tiny import make_tiny_checkpoint
    return [tiny_checkpoint, make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-b"), seed=1)]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _edit_files(out):
    return {os.path.relpath(os.path.join(d, f), out): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(os.path.join(out, "edits")) for f in files
            if f.endswith(".png") and not f.startswith(".")}


def test_run_is_resumable_and_reports(scenes, checkpoints, tmp_path):
    out, torch_before = str(tmp_path / "eval"), "torch" in sys.modules
    kw = dict(masks=scenes["masks"], styles=scenes["styles"], instruction="cover the road with snow", steps=2,
              batch_size=10, log=lambda s: None)
    # A run killed after 10 edits (the hook stops it as a kill would: no metrics, no report).
    r = evaluate.run(checkpoints, scenes["images"], out, max_edits=10, **kw)
    assert r["edits"] == {"computed": 10, "cached": 0, "stopped": True}
    first = _edit_files(out)
    assert len(first) == 10 and not os.path.exists(os.path.join(out, "metrics.csv"))
    # a half-written temp file left by the kill is ignored
    open(os.path.join(out, "edits", "tiny-ip2p", "default", ".partial-x.png"), "wb").close()

    r = evaluate.run(checkpoints, scenes["images"], out, **kw)
    assert r["edits"] == {"computed": 30, "cached": 10, "stopped": False}
    assert r["metrics"] == ["l2_out", "l1", "l2", "psnr", "ssim"] and r["pixel_values"] == 40 * 5
    files = _edit_files(out)
    assert len(files) == 40 and all(files[f] == t for f, t in first.items())  # finished edits not redone
    a = imio.read_image(os.path.join(out, "edits", "tiny-ip2p", "default", "scene_0003.png"))
    b = imio.read_image(os.path.join(out, "edits", "tiny-b", "default", "scene_0003.png"))
    assert a.shape == (64, 64, 3) and np.abs(a.astype(int) - b).mean() > 1  # two different models

    # the second checkpoint ran on the first one's pipeline with its parameters swapped in: the
    # same edits as its own pipeline makes
    from jaxedit.pipeline import EditPipeline
    own = EditPipeline.from_pretrained(checkpoints[1]).edit(
        [imio.read_image(os.path.join(scenes["images"], f"scene_{i:04d}.png")) for i in range(10)],
        "cover the road with snow", steps=2, batch_size=10, image_ids=range(10))
    for i, im in enumerate(own):
        ours = imio.read_image(os.path.join(out, "edits", "tiny-b", "default", f"scene_{i:04d}.png"))
        assert np.abs(ours.astype(int) - np.asarray(im)).max() <= 1

    # everything cached: nothing edited, no metric recomputed
    r = evaluate.run(checkpoints, scenes["images"], out, **kw)
    assert r["edits"] == {"computed": 0, "cached": 40, "stopped": False} and r["pixel_values"] == 0
    assert _edit_files(out) == files
    cli = ["--checkpoints", *checkpoints, "--data", scenes["images"], "--out", out, "--masks", scenes["masks"],
           "--styles", scenes["styles"], "--instruction", "cover the road with snow", "--steps", "2"]
    assert evaluate.main(cli) == 0 and _edit_files(out) == files  # the CLI: same run, all cached
    assert evaluate.main(cli + ["--metrics", "clip_t"]) == 2  # needs --scorer_weights and captions
    with pytest.raises(evaluate.UsageError, match="other parameters"):
        evaluate.run(checkpoints, scenes["images"], out, **dict(kw, steps=3))

    rows = _csv(os.path.join(out, "metrics.csv"))
    assert len(rows) == 40 and list(rows[0]) == ["checkpoint", "setting", "guidance_text", "guidance_image",
                                                 "guidance_style", "image", "l2_out", "l1", "l2", "psnr", "ssim"]
    assert {(r["checkpoint"], r["image"]) for r in rows} == {(c, f"scene_{i:04d}") for c in ("tiny-ip2p", "tiny-b")
                                                             for i in range(20)}
    row = next(r for r in rows if r["checkpoint"] == "tiny-b" and r["image"] == "scene_0003")
    inp = imio.read_image(os.path.join(scenes["images"], "scene_0003.png"))
    assert float(row["l1"]) == pytest.approx(pixel.l1(inp[None], b[None])[0], rel=1e-5)

    # table.md: the bold cell of each column is the best mean of metrics.csv (min, or max for ↑)
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert table[0] == "| Checkpoint | L2_out ↓ | L1 ↓ | L2 ↓ | PSNR ↑ | SSIM ↑ |"
    body = [line.strip("| ").split(" | ") for line in table[2:]]
    assert [c[0] for c in body] == ["tiny-ip2p", "tiny-b"]
    for k, m in enumerate(["l2_out", "l1", "l2", "psnr", "ssim"], start=1):
        means = [np.mean([float(r[m]) for r in rows if r["checkpoint"] == c]) for c in ("tiny-ip2p", "tiny-b")]
        winner = int(np.argmax(means) if m in compute.HIGHER_IS_BETTER else np.argmin(means))
        assert body[winner][k].startswith("**") and not body[1 - winner][k].startswith("**"), (m, means)
        assert float(body[winner][k].strip("*")) == pytest.approx(means[winner], abs=1e-2)

    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert '<table class="metrics">' in page and "<b>" in page and "L2_out ↓" in page
    assert page.count('<img src="data:image/png;base64,') == 8 * 4  # 8 rows: input | style | 2 checkpoints
    assert "src=\"http" not in page and "<svg" not in page  # self-contained; no sweep, no plot
    if not torch_before:  # (another test in this worker may have imported it)
        assert "torch" not in sys.modules  # editing and pixel metrics ran without torch


def test_sweep_model_metrics_and_plots(scenes, checkpoints, tmp_path):
    out, names = str(tmp_path / "sweep"), [f"scene_{i:04d}" for i in range(4)]
    data = tmp_path / "four"
    data.mkdir()
    for n in names:
        os.link(os.path.join(scenes["images"], n + ".png"), data / (n + ".png"))
    captions = tmp_path / "captions.csv"
    captions.write_text("name,output,input\n" + "".join(f"{n},a snowy road,a road\n" for n in names))
    kw = dict(masks=scenes["masks"], styles=scenes["styles"], instruction="cover the road with snow",
              captions=str(captions), sweeps=["guidance_image=1.0:2.0:2"], steps=2, batch_size=4,
              metrics=list(compute.METRICS), scorer_weights="tiny", sty_embedders=("dinov2", "clip"),
              log=lambda s: None)
    r = evaluate.run(checkpoints, str(data), out, **kw)
    assert r["edits"]["computed"] == 16 and r["metric_jobs"] == 16
    rows = _csv(os.path.join(out, "metrics.csv"))
    assert len(rows) == 16 and {r["setting"] for r in rows} == {"guidance_image=1", "guidance_image=2"}
    assert {r["guidance_image"] for r in rows} == {"1", "2"}
    for m in compute.METRICS:
        assert all(math.isfinite(float(r[m])) for r in rows), m
    assert all(-1 <= float(r[m]) <= 1 for r in rows for m in ("clip_t", "clip_dir", "clip_i", "dino", "sty_in"))
    e1, e2 = (imio.read_image(os.path.join(out, "edits", "tiny-b", s, "scene_0000.png"))
              for s in ("guidance_image=1", "guidance_image=2"))
    assert not np.array_equal(e1, e2)

    for x in ("l2", "depth_all"):
        for y in ("clip_t", "clip_dir", "sty_in"):
            stem = os.path.join(out, "plots", f"tradeoff_guidance_image_{x}_vs_{y}")
            svg = ET.parse(stem + ".svg").getroot()
            texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
            assert "tiny-ip2p" in texts and "tiny-b" in texts and "1" in texts and "2" in texts
            with Image.open(stem + ".png") as im:
                assert im.size == (1440, 920) and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert page.count("<svg") == 6 and "guidance_image sweep: L2 vs CLIP-T" in page
    assert page.count('<img src="data:') == 4 * (2 + 2 * 2)  # input | style | 2 checkpoints x 2 settings

    r = evaluate.run(checkpoints, str(data), out, **kw)  # all cached: no edit, no scorer process
    assert r["edits"]["computed"] == 0 and r["metric_jobs"] == 0 and r["pixel_values"] == 0
    assert _csv(os.path.join(out, "metrics.csv")) == rows
    # redone edits (their files changed) have their metrics recomputed; only theirs
    for n in names:
        os.remove(os.path.join(out, "edits", "tiny-b", "guidance_image=2", n + ".png"))
    r = evaluate.run(checkpoints, str(data), out, **dict(kw, metrics=["l1", "psnr"]))
    assert r["edits"]["computed"] == 4 and r["pixel_values"] == 4 * 2 and r["metric_jobs"] == 0


def _magicbrush(root):
    sessions, local = {}, {}
    for k, sid in enumerate(("100", "200")):
        folder = os.path.join(root, "images", sid)
        image, mask = road_scene((7, k), 64)
        imio.write_image(image, os.path.join(folder, f"{sid}-input.png"))
        turns = []
        for t in (1, 2):
            image = road_edit(image, mask, 0.5)
            imio.write_image(image, os.path.join(folder, f"{sid}-output{t}.png"))
            imio.write_image(mask.astype(np.uint8) * 255, os.path.join(folder, f"{sid}-mask{t}.png"))
            turns.append({"input": f"{sid}-input.png" if t == 1 else f"{sid}-output{t - 1}.png",
                          "output": f"{sid}-output{t}.png", "mask": f"{sid}-mask{t}.png",
                          "instruction": "make the road whiter"})
            local.setdefault(sid, {})[f"{sid}-output{t}.png"] = f"a whiter road {t}"
        sessions[sid] = turns
    json.dump(sessions, open(os.path.join(root, "edit_sessions.json"), "w"))
    json.dump(local, open(os.path.join(root, "local_descriptions.json"), "w"))
    return root


def test_magicbrush_protocol_compares_with_the_target(checkpoints, tmp_path):
    data, out = _magicbrush(str(tmp_path / "mb")), str(tmp_path / "out")
    items = evaluate.load_items(data, magicbrush=True)
    assert [it.name for it in items] == ["100-output1", "100-output2", "200-output1", "200-output2"]
    assert items[1].input.endswith("100-output1.png") and items[1].caption == "a whiter road 2"
    assert evaluate.choose_metrics(None, items, magicbrush=True, weights="tiny") == ["l1", "l2", "clip_i", "dino",
                                                                                     "clip_t"]
    r = evaluate.run(checkpoints[:1], data, out, magicbrush=True, steps=2, batch_size=4, log=lambda s: None)
    assert r["metrics"] == ["l1", "l2"] and r["edits"]["computed"] == 4  # no scorer weights: pixel metrics
    rows = _csv(os.path.join(out, "metrics.csv"))
    edit = imio.read_image(os.path.join(out, "edits", "tiny-ip2p", "default", "200-output2.png"))
    target = imio.read_image(os.path.join(data, "images", "200", "200-output2.png"))
    row = next(r for r in rows if r["image"] == "200-output2")
    assert float(row["l2"]) == pytest.approx(pixel.l2(target[None], edit[None])[0], rel=1e-5)
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert "<th>target</th>" in page and "MagicBrush" in page


def test_table_marks_the_best_per_direction_and_sweep_parsing():
    summary = [{"checkpoint": "a", "setting": "s1", "l2": 0.2, "clip_t": 0.30, "psnr": math.nan},
               {"checkpoint": "b", "setting": "s1", "l2": 0.1, "clip_t": 0.25, "psnr": math.nan},
               {"checkpoint": "c", "setting": "s2", "l2": 0.1, "clip_t": 0.20, "psnr": math.nan}]
    lines = report.markdown_table(summary, ["l2", "clip_t", "psnr"]).splitlines()
    assert lines[0] == "| Checkpoint | Setting | L2 ↓ | CLIP-T ↑ | PSNR ↑ |"
    assert lines[2] == "| a | s1 | 0.2000 | **0.3000** | – |"
    assert lines[3] == "| b | s1 | **0.1000** | 0.2500 | – |" and lines[4].startswith("| c | s2 | **0.1000** |")
    assert evaluate.parse_sweep("guidance_image=1.0:2.0:5") == ("guidance_image", [1.0, 1.25, 1.5, 1.75, 2.0])
    assert evaluate.parse_sweep("guidance_style=1,3") == ("guidance_style", [1.0, 3.0])
    for bad in ("guidance=1:2:3", "guidance_image=", "guidance_image=a:b:2"):
        with pytest.raises(evaluate.UsageError):
            evaluate.parse_sweep(bad)
    names = [n for n, _ in evaluate.settings({"guidance_image": [1.0, 1.5], "guidance_style": [3.0]},
                                             evaluate.GUIDANCE)]
    assert names == ["guidance_image=1_guidance_style=3", "guidance_image=1.5_guidance_style=3"]
    assert evaluate.checkpoint_names(["x/model", "y/model/"]) == {"model": "x/model", "model-2": "y/model/"}


def test_evaluation_process_never_imports_torch():
    code = ("import sys, jaxedit.evaluate, jaxedit.metrics.report, jaxedit.metrics.compute, jaxedit.metrics.dataset;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_local_weight_folders_load_and_score(scenes, checkpoints, tmp_path):
    """`--scorer_weights=DIR`: the transformers folders load (DINO as a ViTModel) and score, in
    this process (the CLI runs the same code in its child process); a missing folder fails early."""
    torch = pytest.importorskip("torch")
    from transformers import ViTConfig, ViTModel
    from jaxedit.metrics.clip_metrics import ClipMetrics
    from jaxedit.scorers.depth import DepthScorer
    from jaxedit.scorers.embed import tiny_model
    weights = tmp_path / "weights"
    with pytest.raises(FileNotFoundError, match="clip"):
        evaluate.run(checkpoints, scenes["images"], str(tmp_path / "out"), instruction="x", metrics=["clip_i"],
                     scorer_weights=str(weights), log=lambda s: None)
    assert not (tmp_path / "out").exists()  # refused before editing anything
    clip = ClipMetrics.tiny()
    clip.model.save_pretrained(weights / "clip")
    clip.tokenizer.save_pretrained(weights / "clip")
    DepthScorer.tiny().model.save_pretrained(weights / "depth-anything-v2-small")
    tiny_model("dinov2").save_pretrained(weights / "dinov2")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=56, patch_size=14), add_pooling_layer=False).save_pretrained(weights / "dino")
    models = compute._load_models({"clip", "depth", "dinov2", "dino"}, str(weights), "cpu")
    inp = [imio.read_image(os.path.join(scenes["images"], f"scene_000{i}.png")) for i in range(2)]
    mask = [np.ones((64, 64), np.float32), np.zeros((64, 64), np.float32)]
    style = imio.read_image(sorted(imio.list_images(scenes["styles"]))[0])
    rows = [dict(edit=x[::-1], input=x, reference=x, edit_in=x[::-1], edit_ref=x[::-1], mask=m, style=style,
                 job=dict(caption="a road", input_caption="a scene")) for x, m in zip(inp, mask)]
    todo = [["depth_all", "depth_out", "clip_t", "clip_dir", "clip_i", "dino", "sty_in"]] * 2
    values = compute.model_values(models, rows, todo, ("dinov2", "clip"))
    assert math.isnan(values[0]["depth_out"]) and math.isfinite(values[1]["depth_out"])  # nothing outside
    assert values[1]["depth_out"] == pytest.approx(values[1]["depth_all"])  # empty mask: all is outside
    for v in values:
        assert all(math.isfinite(v[m]) for m in todo[0] if m != "depth_out")
        assert v["depth_all"] > 0 and -1 <= v["dino"] < 1 and -1 <= v["clip_i"] < 1  # a flipped image differs
    same = compute.model_values(models, [dict(rows[0], edit_ref=inp[0], edit_in=inp[0])], [["dino", "depth_all"]],
                                ("dinov2",))[0]
    assert same["dino"] == pytest.approx(1.0, abs=1e-5) and same["depth_all"] == pytest.approx(0.0, abs=1e-6)
