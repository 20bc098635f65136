"""Data: generated scenes/styles, folder sources and validation, the grain loader (resume, sharding)."""
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxedit.data import scenes
from jaxedit.data.folders import DataError, build_index, list_inputs, load_mask, load_square
from jaxedit.data.images import write_image
from jaxedit.data.loader import make_loader

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return scenes.write_dataset(str(tmp_path_factory.mktemp("scenes")), n_images=13, n_styles=3,
                                style="snow", seed=1, size=SIZE)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --- generated scenes and styles -------------------------------------------------------------

def test_scenes_are_deterministic_and_independent_of_count(tmp_path):
    a = scenes.write_dataset(str(tmp_path / "a"), n_images=3, n_styles=2, seed=5, size=SIZE)
    b = scenes.write_dataset(str(tmp_path / "b"), n_images=5, n_styles=4, seed=5, size=SIZE)
    for sub in ("images", "masks", "styles"):
        for f in sorted(os.listdir(a[sub])):
            np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(a[sub], f))),
                                          np.asarray(Image.open(os.path.join(b[sub], f))))
    img0, mask0 = scenes.road_scene((5, 0, 0), SIZE)
    img1, _ = scenes.road_scene((5, 0, 1), SIZE)
    assert img0.dtype == np.uint8 and img0.shape == (SIZE, SIZE, 3) and mask0.dtype == bool
    assert not np.array_equal(img0, img1)
    assert 0.05 < mask0.mean() < 0.7 and not mask0[0].any()      # road below the horizon only
    # regenerating with fewer images removes the stale generated files
    c = scenes.write_dataset(str(tmp_path / "b"), n_images=2, n_styles=1, seed=5, size=SIZE)
    assert len(os.listdir(c["images"])) == 2 and len(os.listdir(c["styles"])) == 1


@pytest.mark.parametrize("style", scenes.STYLES)
def test_style_images(style):
    a, b = scenes.style_image(style, 0, SIZE), scenes.style_image(style, 1, SIZE)
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(a, scenes.style_image(style, 0, SIZE))
    assert not np.array_equal(a, b)


def test_style_look():
    snow, night = scenes.style_image("snow", 0, 64), scenes.style_image("night", 0, 64)
    assert snow.mean() > 190 and snow[..., 2].mean() >= snow[..., 0].mean()   # white, bluish
    assert night.mean() < 80
    with pytest.raises(ValueError, match="unknown style"):
        scenes.style_image("lava", 0)


def test_loader_mask_is_the_exact_generated_road_mask(dataset):
    loader = make_loader(dataset["images"], dataset["styles"], dataset["masks"], resolution=SIZE,
                         batch_size=13, shuffle=False, num_epochs=1)
    batch = next(loader)
    for j, i in enumerate(batch["index"]):
        image, mask = scenes.road_scene((1, 0, int(i)), SIZE)
        np.testing.assert_array_equal(batch["image"][j], image)
        np.testing.assert_array_equal(batch["mask"][j], mask.astype(np.float32))


# --- sources and validation ------------------------------------------------------------------

def test_list_file_relative_paths(dataset, tmp_path):
    names = sorted(os.listdir(dataset["images"]))[:4]
    lst = tmp_path / "train.txt"
    rel = os.path.relpath(dataset["images"], tmp_path)
    lst.write_text("# inputs\n" + "\n".join(os.path.join(rel, n) for n in names[::-1]) + "\n\n")
    paths = list_inputs(str(lst))
    assert [os.path.basename(p) for p in paths] == names[::-1] and all(os.path.isfile(p) for p in paths)
    index = build_index(str(lst), dataset["styles"], dataset["masks"])
    assert len(index) == 4 and [os.path.basename(p) for p in index.images] == names[::-1]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="empty.txt"):
        list_inputs(str(tmp_path / "empty.txt"))


def test_empty_folders_are_clear_errors(dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"no images in folder .*empty.*\.png"):
        build_index(str(empty), dataset["styles"])
    with pytest.raises(DataError, match=r"no style images in folder .*empty.*\.png"):
        build_index(dataset["images"], str(empty))
    with pytest.raises(DataError, match=r"no masks in folder .*empty"):
        build_index(dataset["images"], dataset["styles"], str(empty))
    with pytest.raises(DataError, match="style folder not found"):
        build_index(dataset["images"], str(tmp_path / "nope"))


def test_missing_mask_names_the_image(dataset, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for f in sorted(os.listdir(dataset["masks"]))[1:]:
        os.link(os.path.join(dataset["masks"], f), masks / f)
    with pytest.raises(DataError, match=r"no mask for image .*scene_0000\.png"):
        build_index(dataset["images"], dataset["styles"], str(masks))
    index = build_index(dataset["images"], dataset["styles"], None)     # whole-frame masks
    assert index.masks == (None,) * 13
    np.testing.assert_array_equal(load_mask(None, 8), np.ones((8, 8), np.float32))


def test_mask_of_wrong_size_names_both_sizes(tmp_path):
    write_image(np.zeros((20, 30, 3), np.uint8), str(tmp_path / "img" / "a.png"))
    write_image(np.zeros((10, 15), np.uint8), str(tmp_path / "mask" / "a.png"))
    write_image(np.zeros((8, 8, 3), np.uint8), str(tmp_path / "sty" / "s.png"))
    with pytest.raises(DataError, match=r"mask .*a\.png is 15x10 .* image .*a\.png is 30x20"):
        build_index(str(tmp_path / "img"), str(tmp_path / "sty"), str(tmp_path / "mask"))


def test_unreadable_files_are_skipped_up_to_a_limit(dataset, tmp_path):
    images, styles = tmp_path / "images", tmp_path / "styles"
    images.mkdir(), styles.mkdir()
    for f in sorted(os.listdir(dataset["images"]))[:6]:
        os.link(os.path.join(dataset["images"], f), images / f)
    for f in os.listdir(dataset["styles"]):
        os.link(os.path.join(dataset["styles"], f), styles / f)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    (styles / "bad.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable file\(s\).*broken\.png"):
        loader = make_loader(str(images), str(styles), resolution=SIZE, batch_size=3, max_bad_files=3)
    assert len(loader.index) == 6 and len(loader.skipped) == 3 and len(loader.index.styles) == 3
    assert next(loader)["image"].shape == (3, SIZE, SIZE, 3)
    with pytest.raises(DataError, match=r"3 unreadable files, more than max_bad_files=2"):
        build_index(str(images), str(styles), max_bad_files=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_index(dataset["images"], dataset["styles"], dataset["masks"])   # clean data: no warning


def test_unreadable_mask_or_missing_listed_file_skips_the_example(dataset, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for f in os.listdir(dataset["masks"]):
        os.link(os.path.join(dataset["masks"], f), masks / f)
    os.remove(masks / "scene_0002.png")
    (masks / "scene_0002.png").write_bytes(b"junk")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([os.path.join(dataset["images"], "scene_0001.png"),
                              os.path.join(dataset["images"], "scene_0002.png"), "missing/scene_0099.png"]))
    (masks / "scene_0099.png").write_bytes((masks / "scene_0001.png").read_bytes())
    with pytest.warns(UserWarning, match="skipped 2"):
        index = build_index(str(lst), dataset["styles"], str(masks))
    assert [os.path.basename(p) for p in index.images] == ["scene_0001.png"]
    assert {os.path.basename(p) for p, _ in index.skipped} == {"scene_0002.png", "scene_0099.png"}


def test_resize_and_center_crop_convention(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)          # H=30, W=50
    write_image(img, str(tmp_path / "a.png"))
    out = load_square(str(tmp_path / "a.png"), 12)
    ref = np.asarray(Image.fromarray(img).resize((20, 12), Image.LANCZOS))[:, 4:16]
    np.testing.assert_array_equal(out, ref)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    # masks: binarised (white = 1), resized bilinearly, binarised again, same crop
    mask = np.zeros((30, 50), np.uint8)
    mask[:, 25:] = 200
    write_image(mask, str(tmp_path / "m.png"))
    m = load_mask(str(tmp_path / "m.png"), 12, (50, 30))
    assert m.dtype == np.float32 and m.shape == (12, 12) and set(np.unique(m)) == {0.0, 1.0}
    np.testing.assert_array_equal(m[0], (np.arange(4, 16) >= 10).astype(np.float32))
    with pytest.raises(DataError, match="50x30"):
        load_mask(str(tmp_path / "m.png"), 12, (40, 30))


# --- loader ----------------------------------------------------------------------------------

def test_batches_format_and_style_cycling(dataset):
    loader = make_loader(dataset["images"], dataset["styles"], dataset["masks"], resolution=16,
                         batch_size=4, seed=0)
    batch = next(loader)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 16, 16, 3)
    assert batch["style"].dtype == np.uint8 and batch["style"].shape == (4, 16, 16, 3)
    assert batch["mask"].dtype == np.float32 and batch["mask"].shape == (4, 16, 16)
    assert batch["index"].dtype == np.int32 and batch["index"].shape == (4,)
    assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
    styles = loader.index.styles
    for j, i in enumerate(batch["index"]):
        np.testing.assert_array_equal(batch["image"][j], load_square(loader.index.images[i], 16))
        np.testing.assert_array_equal(batch["style"][j], load_square(styles[i % len(styles)], 16))


def test_epochs_shuffle_and_determinism(dataset):
    kw = dict(resolution=SIZE, batch_size=13, num_epochs=3)
    a = make_loader(dataset["images"], dataset["styles"], dataset["masks"], seed=7, **kw)
    orders = [next(a)["index"].tolist() for _ in range(3)]
    with pytest.raises(StopIteration):
        next(a)
    assert a.num_batches == 3
    assert all(sorted(o) == list(range(13)) for o in orders)       # each epoch a permutation
    assert orders[0] != orders[1] and orders[0] != list(range(13))  # reshuffled every epoch
    b = make_loader(dataset["images"], dataset["styles"], dataset["masks"], seed=7, **kw)
    assert [next(b)["index"].tolist() for _ in range(3)] == orders
    c = make_loader(dataset["images"], dataset["styles"], dataset["masks"], seed=8, **kw)
    assert next(c)["index"].tolist() != orders[0]
    d = make_loader(dataset["images"], dataset["styles"], dataset["masks"], shuffle=False, **kw)
    assert next(d)["index"].tolist() == list(range(13))


def test_resume_gives_identical_batches(dataset):
    kw = dict(resolution=SIZE, batch_size=5, seed=3)                 # 13 examples: batches straddle epochs
    full = make_loader(dataset["images"], dataset["styles"], dataset["masks"], **kw)
    first = _take(full, 4)
    state = json.loads(json.dumps(full.get_state()))                # what a checkpoint would hold
    rest = _take(full, 6)
    resumed = make_loader(dataset["images"], dataset["styles"], dataset["masks"], **kw)
    resumed.set_state(state)
    _same(_take(resumed, 6), rest)
    fresh = make_loader(dataset["images"], dataset["styles"], dataset["masks"], **kw)
    _same(_take(fresh, 10), first + rest)                            # uninterrupted run


def test_resume_after_moving_the_data_folder(dataset, tmp_path):
    import shutil
    root = os.path.dirname(dataset["images"])
    moved = shutil.copytree(root, tmp_path / "moved")
    kw = dict(resolution=SIZE, batch_size=4, seed=1)
    a = make_loader(dataset["images"], dataset["styles"], dataset["masks"], **kw)
    _take(a, 2)
    state, rest = a.get_state(), _take(a, 3)
    b = make_loader(str(moved / "images"), str(moved / "styles" / "snow"), str(moved / "masks"), **kw)
    b.set_state(state)
    _same(_take(b, 3), rest)


def test_resume_checks_the_state_matches(dataset):
    kw = dict(resolution=SIZE, batch_size=5)
    state = make_loader(dataset["images"], dataset["styles"], dataset["masks"], seed=3, **kw).get_state()
    other = make_loader(dataset["images"], dataset["styles"], dataset["masks"], seed=4, **kw)
    with pytest.raises(DataError, match="does not match"):
        other.set_state(state)
    with pytest.raises(DataError, match="worker_count=2"):
        other.set_state({**state, "worker_count": 2})


def test_per_host_shards_are_disjoint_and_equal(dataset):
    hosts = [make_loader(dataset["images"], dataset["styles"], dataset["masks"], resolution=SIZE,
                         batch_size=3, seed=0, num_epochs=1, host_index=h, host_count=2) for h in range(2)]
    seen = [np.concatenate([b["index"] for b in h]).tolist() for h in hosts]
    assert hosts[0].num_batches == hosts[1].num_batches == 2         # 13 // 2 = 6 per host
    assert len(seen[0]) == len(seen[1]) == 6 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(12))             # example 12 (remainder) dropped
    assert set(seen[0]) == set(range(0, 12, 2))
    # the sharded stream resumes too
    h = make_loader(dataset["images"], dataset["styles"], dataset["masks"], resolution=SIZE, batch_size=2,
                    seed=0, host_index=1, host_count=2)
    _take(h, 2)
    state, rest = h.get_state(), _take(h, 4)
    again = make_loader(dataset["images"], dataset["styles"], dataset["masks"], resolution=SIZE,
                        batch_size=2, seed=0, host_index=1, host_count=2)
    again.set_state(state)
    _same(_take(again, 4), rest)
    with pytest.raises(ValueError, match="host_index"):
        make_loader(index=h.index, resolution=SIZE, batch_size=2, host_index=2, host_count=2)
    with pytest.raises(DataError, match="less than one batch"):
        make_loader(index=h.index, resolution=SIZE, batch_size=7, num_epochs=1, host_count=2)


@pytest.mark.skipif(not os.environ.get("JAXEDIT_SLOW_TESTS"), reason="worker processes: set JAXEDIT_SLOW_TESTS=1")
def test_worker_processes_give_the_same_batches(dataset):
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    kw = dict(resolution=SIZE, batch_size=3, seed=2)
    ref = _take(make_loader(dataset["images"], dataset["styles"], dataset["masks"], **kw), 6)
    mp = make_loader(dataset["images"], dataset["styles"], dataset["masks"], worker_count=2, **kw)
    try:
        got = _take(mp, 3)
        state = json.loads(json.dumps(mp.get_state()))
    finally:
        mp.close()
    _same(got, ref[:3])
    again = make_loader(dataset["images"], dataset["styles"], dataset["masks"], worker_count=2, **kw)
    try:
        again.set_state(state)
        _same(_take(again, 3), ref[3:])
    finally:
        again.close()
