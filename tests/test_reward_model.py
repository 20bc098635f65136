"""HIVE reward model: Bradley-Terry loss, ranking files, BLIP pre-processing, freezing, learning,
CLI train/resume/score, save/load (tiny random BLIP, CPU)."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

torch = pytest.importorskip("torch")
from jaxedit import reward_model as cli  # noqa: E402
from jaxedit.data import rankings as rk  # noqa: E402
from jaxedit.scorers.reward_model import (  # noqa: E402
    EditRewardModel, RewardScorer, bradley_terry_loss, preprocess)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def make_rankings(folder, n, *, k=5, size=32, seed=0, target=(128, 128, 128)):
    """n rankings of k edits: a flat random background, each edit paints the same square (12-16 px,
    random place) a random colour; rank = order of the colour's distance to `target` (1 = closest).
    The default target is the centre of the colour cube, so no linear function of the colour (what
    a random model computes) predicts the rank: an untrained model is at chance."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        s = int(rng.integers(12, 17))
        y, x = rng.integers(0, size - s + 1, 2)
        Image.fromarray(img).save(os.path.join(folder, f"{i}_in.png"))
        colours = rng.integers(0, 256, (k, 3))
        ranks = np.argsort(np.argsort(np.linalg.norm(colours - np.array(target), axis=1))) + 1
        for j, c in enumerate(colours):
            e = img.copy()
            e[y:y + s, x:x + s] = c
            Image.fromarray(e).save(os.path.join(folder, f"{i}_{j}.png"))
        rows.append({"input": f"{i}_in.png", "instruction": "make the square gray",
                     "edits": [f"{i}_{j}.png" for j in range(k)], "ranks": ranks.tolist()})
    path = os.path.join(folder, "rankings.jsonl")
    rk.write_rankings(path, rows)
    return path


# ---- Bradley-Terry ----

def _bt_numpy(rewards, ranks):
    terms = [np.log1p(np.exp(-(r[i] - r[j])))
             for r, k in zip(np.asarray(rewards, np.float64), ranks)
             for i in range(len(k)) for j in range(len(k)) if 1 <= k[i] < k[j]]
    return np.mean(terms) if terms else 0.0


def test_bradley_terry_loss_matches_numpy_float64():
    rng = np.random.default_rng(0)
    rewards = rng.normal(0, 3, (6, 5))
    ranks = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [1, 1, 2, 2, 3], [2, 1, 2, 1, 1],
                      [1, 2, 2, 0, 0],  # 3 edits, padded with rank 0
                      [3, 1, 2, 1, 3]])
    got = bradley_terry_loss(torch.tensor(rewards, dtype=torch.float32), torch.tensor(ranks))
    np.testing.assert_allclose(float(got), _bt_numpy(rewards, ranks), rtol=1e-6)
    # pairs counted: 10 + 10 + 8 + 6 + 2 + 8; ties and padding give none
    assert sum(len(rk.ranking_pairs([x for x in k if x > 0])) for k in ranks) == 44
    r = torch.zeros(2, 3, requires_grad=True)
    zero = bradley_terry_loss(r, torch.tensor([[1, 1, 1], [2, 2, 0]]))  # no pair at all
    zero.backward()
    assert zero.item() == 0.0 and r.grad.abs().sum().item() == 0.0


# ---- ranking files ----

GOOD = {"input": "in.png", "instruction": "make it red", "edits": ["a.png", "b.png", "c.png"], "ranks": [2, 1, 2]}


@pytest.mark.parametrize("line, message", [
    ('{"input": "in.png", ', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    (dict(GOOD, ranks=None), "line 2: \"ranks\" must be a list of integers"),
    ({k: v for k, v in GOOD.items() if k != "ranks"}, "line 2: missing key\\(s\\) 'ranks'"),
    (dict(GOOD, input="nope.png"), "line 2: image not found: .*nope.png"),
    (dict(GOOD, edits=["a.png", "gone.png", "c.png"]), "line 2: image not found: .*gone.png"),
    (dict(GOOD, edits=["a.png"], ranks=[1]), "line 2: \"edits\" must hold at least 2 images to rank, got 1"),
    (dict(GOOD, ranks=[1, 2]), "line 2: len\\(\"ranks\"\\) = 2 differs from len\\(\"edits\"\\) = 3"),
    (dict(GOOD, ranks=[1, 2.5, 3]), "line 2: \"ranks\" must be integers .*2.5"),
    (dict(GOOD, ranks=[1, "2", 3]), "line 2: \"ranks\" must be integers .*'2'"),
    (dict(GOOD, ranks=[1, True, 2]), "line 2: \"ranks\" must be integers .*True"),
    (dict(GOOD, ranks=[0, 1, 2]), "line 2: \"ranks\" must be >= 1"),
    (dict(GOOD, ranks=[1, 3, 3]), "line 2: \"ranks\" \\[1, 3, 3\\] is not a dense ranking"),
    (dict(GOOD, ranks=[1, 1, 3]), "line 2: \"ranks\" \\[1, 1, 3\\] is not a dense ranking"),
    (dict(GOOD, ranks=[1, 1, 1]), "line 2: \"ranks\" \\[1, 1, 1\\]: all edits are tied"),
    (dict(GOOD, instruction=3), "line 2: \"instruction\" must be a string"),
])
def test_bad_ranking_lines_name_the_line(tmp_path, line, message):
    for name in ("in.png", "a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    text = json.dumps(GOOD) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n"
    (tmp_path / "r.jsonl").write_text(text)
    with pytest.raises(rk.RankingError, match="r.jsonl " + message):
        rk.read_rankings(str(tmp_path / "r.jsonl"))


def test_good_rankings_pairs_and_corrupt_image(tmp_path):
    for name in ("in.png", "a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    bad = dict(GOOD, input="sub/bad.png", extra="ignored")
    (tmp_path / "r.jsonl").write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n")
    r1, r2 = rk.read_rankings(str(tmp_path / "r.jsonl"))
    assert (r1.line, r2.line) == (1, 3) and r1.edits[0] == str(tmp_path / "a.png")
    assert r1.pairs() == [(1, 0), (1, 2)]                    # b beats a and c; a, c tied: no pair
    inp, edits = rk.load_images(r1)
    assert inp.shape == (8, 8, 3) and len(edits) == 3
    with pytest.raises(rk.RankingError, match=r"r.jsonl line 3: cannot read image .*sub/bad.png"):
        rk.load_images(r2)
    assert rk.pairwise_accuracy([[0.0, 1.0, 0.0], [2.0, 1.0]], [[2, 1, 2], [1, 2]]) == (1.0, 3)
    assert rk.pairwise_accuracy([[1.0, 1.0], [0.0, 1.0]], [[1, 2], [1, 2]]) == (0.25, 2)  # equal: 1/2


# ---- model ----

def test_preprocess_matches_blip_image_processor():
    """Our resize + normalisation = BlipImageProcessorPil's pixel values (max abs diff 0 measured;
    tolerance 1e-6), for down-scaling, up-scaling, non-square and already-sized images."""
    from transformers import BlipImageProcessorPil
    rng = np.random.default_rng(0)
    for size, images in [(384, [skdata.astronaut(), skdata.coffee(), rng.integers(0, 256, (50, 70, 3), np.uint8)]),
                         (32, [skdata.chelsea(), rng.integers(0, 256, (32, 32, 3), np.uint8)])]:
        ref = BlipImageProcessorPil(size={"height": size, "width": size})(images=images, return_tensors="pt")
        ours = preprocess(images, size)
        assert ours.shape == ref["pixel_values"].shape == (len(images), 3, size, size)
        np.testing.assert_allclose(ours.numpy(), ref["pixel_values"].numpy(), atol=1e-6, rtol=0)


def test_image_type_embedding_breaks_the_input_edit_symmetry():
    """Without the 'which image' embedding, R(a, c, b) = R(b, c, a) (cross-attention ignores key
    order); with a non-zero one, it does not."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 3, 32, 32, 3), np.uint8)
    text = ["add a dog"] * 3
    plain, typed = EditRewardModel.tiny(image_type_embedding=False), EditRewardModel.tiny()
    with torch.no_grad():
        for m in (plain, typed):
            m.head.weight.normal_(0, 1)  # the random head's 0.02 scale hides the images' effect
        typed.image_type.normal_(0, 1)
    sym = np.abs(plain.score(a, text, b) - plain.score(b, text, a)).max()
    asym = np.abs(typed.score(a, text, b) - typed.score(b, text, a)).max()
    assert sym < 1e-6 and asym > 1e-4, (sym, asym)  # measured: 0 and 5e-4 (near-uniform random attention)


@pytest.mark.parametrize("text_layers, vision_layers", [(1, 1), (2, 0)])
def test_one_step_changes_only_the_trainable_parameters(tmp_path, text_layers, vision_layers):
    path = make_rankings(str(tmp_path / "d"), 6)
    cli.train(path, "tiny", str(tmp_path / "out"), 1, lr=1e-3, batch=4, val_fraction=0.0,
              train_text_layers=text_layers, train_vision_layers=vision_layers, log=lambda s: None)
    before = dict(EditRewardModel.tiny(seed=0).named_parameters())
    after = EditRewardModel.load(str(tmp_path / "out"))
    prefixes = [f"text.encoder.layer.{i}." for i in range(2 - text_layers, 2)]  # the tiny model has 2 + 2 layers
    prefixes += [f"vision.encoder.layers.{i}." for i in range(2 - vision_layers, 2)]
    prefixes += ["vision.post_layernorm."] if vision_layers else []
    declared = {"head.weight", "head.bias", "image_type"} | {n for n in before if n.startswith(tuple(prefixes))}
    assert set(after.trainable_names()) == declared
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    assert changed == declared


def test_tiny_model_learns_a_synthetic_ranking(tmp_path):
    """Rank = distance of an edited square's colour to a hidden colour (the colour cube's centre).
    Paper's trainable set (last text + last vision layer, head, image-type embedding). Measured:
    untrained 0.53 (chance 0.5), after 200 steps 0.875 held-out pairwise accuracy, ~10 s."""
    path = make_rankings(str(tmp_path / "d"), 320)
    val = cli.split(rk.read_rankings(path), 0.2, 0)[1]
    untrained, n = cli.accuracy(EditRewardModel.tiny(seed=0), val, cli.ImageCache(32))
    logs = []
    res = cli.train(path, "tiny", str(tmp_path / "out"), 200, lr=2e-3, batch=32, val_fraction=0.2, seed=0,
                    eval_every=100, save_every=1000, log=logs.append)
    print(f"held-out pairwise accuracy: untrained {untrained:.3f}, trained {res['val_accuracy']:.3f} "
          f"({n} pairs, chance 0.5)")
    assert n == res["val_pairs"] == 640
    assert abs(untrained - 0.5) < 0.15
    assert res["val_accuracy"] >= 0.8
    assert any("held-out pairwise accuracy" in s for s in logs)


def _weights(path):
    return {n: p.detach().clone() for n, p in EditRewardModel.load(path).named_parameters()}


def test_cli_train_resumes_and_score_prints_accuracy(tmp_path, capsys):
    path = make_rankings(str(tmp_path / "d"), 12)
    out = str(tmp_path / "rm")
    base = ["prog", "train", f"--data={path}", "--init=tiny", f"--out={out}", "--batch=4", "--lr=1e-3",
            "--save_every=2", "--eval_every=2", "--val_fraction=0.25"]
    assert cli.main(base + ["--steps=3"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["step"] == 3
    assert cli.main(base + ["--steps=5"]) == 0          # a second run resumes at step 3
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 3" in printed and "step 5:" in printed
    assert "step 1:" not in printed.split("resumed from")[1]
    assert torch.load(os.path.join(out, cli.STATE), weights_only=True)["step"] == 5
    # resuming gives exactly what an uninterrupted 5-step run gives
    assert cli.main(base[:4] + [f"--out={tmp_path / 'straight'}"] + base[5:] + ["--steps=5"]) == 0
    w1, w2 = _weights(out), _weights(str(tmp_path / "straight"))
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    capsys.readouterr()
    assert cli.main(["prog", "score", f"--model={out}", f"--data={path}"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"pairwise accuracy \d\.\d{4} over 120 pairs \(chance 0.5\)", printed)
    assert printed.count("reward ") == 60
    assert cli.main(["prog", "score", f"--model={out}", f"--data={path}", f"--out={tmp_path / 'r.jsonl'}"]) == 0
    rows = [json.loads(s) for s in open(tmp_path / "r.jsonl")]
    assert len(rows) == 12 and len(rows[0]["rewards"]) == 5
    # usage and data errors
    assert cli.main(["prog", "train", f"--data={path}"]) == 2
    assert cli.main(["prog", "bogus"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"input": "x.png"}\n')
    assert cli.main(["prog", "score", f"--model={out}", f"--data={tmp_path / 'bad.jsonl'}"]) == 1
    assert "bad.jsonl line 1: missing key(s) 'instruction', 'edits', 'ranks'" in capsys.readouterr().err


def test_save_load_round_trip_and_scorer(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (2, 4, 40, 48, 3), np.uint8)
    text = ["make it red", "add a dog", "", "turn the sky into a sunset"]
    model = EditRewardModel.tiny(seed=3, train_text_layers=2, train_vision_layers=0)
    with torch.no_grad():
        model.image_type.normal_(0, 1)
    model.save(str(tmp_path / "m"))
    loaded = EditRewardModel.load(str(tmp_path / "m"))
    assert loaded.options() == model.options() and loaded.trainable_names() == model.trainable_names()
    np.testing.assert_array_equal(loaded.score(a, text, b), model.score(a, text, b))
    scorer = RewardScorer(loaded, instruction="make it red")
    masks = np.ones(a.shape[:3], np.float32)
    scores = scorer(a, b, a, masks)
    assert scorer.names == ("reward",) and scores["reward"].dtype == np.float32
    np.testing.assert_allclose(scores["reward"], -model.score(a, ["make it red"] * 4, b), rtol=1e-6)
    from jaxedit.scorers import make_scorer
    s2 = make_scorer("jaxedit.scorers.reward_model:reward_scorer", model=str(tmp_path / "m"), instruction="make it red")
    np.testing.assert_array_equal(s2(a, b, a, masks)["reward"], scores["reward"])


def test_from_blip_takes_the_itm_encoders(tmp_path):
    """A transformers BlipForImageTextRetrieval folder: its vision_model and text_encoder weights are
    used as they are; a tokenizer knowing [ENC] makes it the first token (BLIP's ITM)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval
    from jaxedit.scorers.reward_model import tiny_configs, tiny_tokenizer
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vision, text = tiny_configs(len(tok))
    torch.manual_seed(0)
    itm = BlipForImageTextRetrieval(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                               image_text_hidden_size=16))
    itm.save_pretrained(str(tmp_path / "blip"))
    tok.save_pretrained(str(tmp_path / "blip"))
    model = EditRewardModel.from_blip(str(tmp_path / "blip"))
    ref = itm.state_dict()
    for prefix, module in (("vision_model.", model.vision), ("text_encoder.", model.text)):
        for n, p in module.state_dict().items():
            assert torch.equal(p, ref[prefix + n]), n
    assert model.first_token == "[ENC]"
    ids, _ = model.tokenize(["make it red"])
    assert int(ids[0, 0]) == tok.convert_tokens_to_ids("[ENC]")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 2, 32, 32, 3), np.uint8)
    assert np.isfinite(model.score(a, ["make it red"] * 2, b)).all()


def test_pytorch_side_modules_do_not_import_jax():
    import jaxedit.scorers.reward_model as sm
    for mod in (cli, rk, sm):
        src = open(mod.__file__).read()
        assert not re.search(r"^\s*(import jax|from jax\b)", src, re.M), mod.__name__
    assert not re.search(r"^\s*(import torch|from torch)", open(rk.__file__).read(), re.M)
