"""Instruction datasets: MagicBrush split folders and triples JSONL -> validated examples with
their own instructions; the loader serves them; bad records are clear errors."""
import json
import os

import numpy as np
import pytest

from jaxedit.data import scenes
from jaxedit.data.folders import DataError
from jaxedit.data.images import write_image
from jaxedit.data.instructions import build_instruction_index
from jaxedit.data.loader import make_loader


def _magicbrush(root, sessions):
    """A MagicBrush-layout split folder: images/<id>/<files> + edit_sessions.json."""
    rng = np.random.default_rng(0)
    for img_id, turns in sessions.items():
        for t in turns:
            folder = os.path.join(root, "images", img_id)
            for field, shape in (("input", (48, 64, 3)), ("output", (48, 64, 3)), ("mask", (48, 64, 3))):
                if field == "output":
                    continue  # targets are never read: leaving them out proves it
                img = rng.integers(0, 256, shape, dtype=np.uint8)
                if field == "mask":
                    img[:] = 0
                    img[10:30, 20:40] = 255
                write_image(img, os.path.join(folder, t[field]))
    with open(os.path.join(root, "edit_sessions.json"), "w") as f:
        json.dump(sessions, f)
    return root


def test_magicbrush_every_turn_is_an_example_and_targets_are_not_read(tmp_path):
    sessions = {"100": [{"input": "100-input.png", "output": "100-output1.png", "mask": "100-mask1.png",
                         "instruction": "add a hat"},
                        {"input": "100-output1.png.in.png", "output": "100-output2.png", "mask": "100-mask2.png",
                         "instruction": "make the hat red"}],
                "7": [{"input": "7-input.png", "output": "7-output1.png", "mask": "7-mask1.png",
                       "instruction": "remove the dog"}]}
    root = _magicbrush(str(tmp_path / "train"), sessions)
    ix = build_instruction_index(root)
    assert ix.instructions == ("add a hat", "make the hat red", "remove the dog")   # sessions sorted by id
    assert ix.images[2].endswith(os.path.join("images", "7", "7-input.png")) and ix.styles == ()
    loader = make_loader(index=ix, resolution=32, batch_size=3, seed=0, shuffle=False, num_epochs=1)
    batch = next(loader)
    assert set(batch) == {"image", "mask", "index"} and batch["image"].shape == (3, 32, 32, 3)
    assert [ix.instructions[i] for i in batch["index"]] == list(ix.instructions)
    # 48x64 -> shorter side 32 (32x43), centre crop: the 20x20 white box lands inside
    assert 0.1 < batch["mask"].mean() < 0.3 and set(np.unique(batch["mask"])) == {0.0, 1.0}


def test_triples_jsonl(tmp_path):
    path = scenes.write_triples(str(tmp_path / "gen"), 6, seed=1, size=32)
    ix = build_instruction_index(path)
    assert len(ix) == 6 and ix.instructions[:4] == scenes.INSTRUCTIONS and all(ix.masks)
    # a null mask is the whole frame; relative paths are relative to the file
    with open(path, "a") as f:
        f.write(json.dumps({"input": "images/scene_0000.png", "mask": None, "instruction": "x"}) + "\n\n")
    ix = build_instruction_index(path)
    assert len(ix) == 7 and ix.masks[-1] is None
    loader = make_loader(index=ix, resolution=32, batch_size=7, seed=0, shuffle=False, num_epochs=1)
    assert next(loader)["mask"][-1].min() == 1.0


@pytest.mark.parametrize("line, message", [
    ("not json", r"bad.jsonl:1: not JSON"),
    (json.dumps({"input": "a.png"}), r"bad.jsonl:1: expected \{"),
    (json.dumps({"input": "a.png", "mask": 3, "instruction": "x"}), r"bad.jsonl:1: expected"),
])
def test_bad_triples_are_named(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        build_instruction_index(str(p))


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="expected a MagicBrush folder"):
        build_instruction_index(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="cannot read MagicBrush sessions"):
        build_instruction_index(str(tmp_path))
    (tmp_path / "edit_sessions.json").write_text(json.dumps({"1": [{"input": "a.png", "instruction": "x"}]}))
    with pytest.raises(DataError, match="session '1' turn 0: expected an object with string fields"):
        build_instruction_index(str(tmp_path))
    # a missing input file is skipped up to max_bad_files, then an error naming it
    (tmp_path / "t.jsonl").write_text(json.dumps({"input": "nope.png", "mask": None, "instruction": "x"}) + "\n")
    with pytest.raises(DataError, match="nope.png"):
        build_instruction_index(str(tmp_path / "t.jsonl"), max_bad_files=0)
