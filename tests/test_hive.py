"""Supervised / HIVE pieces: conditioning dropout, denoising and weighted losses (vs float64
NumPy), reward quantisation and its text, the EMA, crop/flip augmentation, the update's
accumulation, cycle-consistency rules, edit-triple data and the reward model's --triples scoring."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxedit.data import scenes
from jaxedit.data.cycle import CycleRules, augment, load_mapping
from jaxedit.data.folders import DataError
from jaxedit.data.images import read_image, write_image
from jaxedit.data.instructions import Triple, build_instruction_index
from jaxedit.data.loader import make_loader
from jaxedit.rl import hive
from jaxedit.rl.update import apply_if_finite, init_train_state


# --- conditioning dropout ----------------------------------------------------------------------

def test_dropout_rates_within_binomial_bounds_and_dropped_tensors():
    n, p = 20_000, 0.05
    text = jax.random.normal(jax.random.key(1), (n, 3, 2)) + 5.0          # never equal to uncond
    image = jax.random.normal(jax.random.key(2), (n, 1, 1, 2)) + 5.0
    uncond = jnp.asarray([[0.5, -0.5], [1.0, 2.0], [3.0, 4.0]])
    t, im, dt, di = hive.dropout_conditioning(jax.random.key(0), text, image, uncond[None], p)
    dt, di = np.asarray(dt), np.asarray(di)
    sigma = np.sqrt(p * (1 - p) / n)
    for name, frac, want in (("text only", np.mean(dt & ~di), p), ("image only", np.mean(~dt & di), p),
                             ("both", np.mean(dt & di), p), ("none", np.mean(~dt & ~di), 1 - 3 * p)):
        bound = 4 * np.sqrt(want * (1 - want) / n)
        assert abs(frac - want) < bound, (name, frac, want, bound)
    assert sigma < 0.002
    t, im = np.asarray(t), np.asarray(im)
    np.testing.assert_array_equal(t[dt], np.broadcast_to(np.asarray(uncond), (dt.sum(), 3, 2)))  # "" embedding
    np.testing.assert_array_equal(t[~dt], np.asarray(text)[~dt])
    assert np.all(im[di] == 0.0)                                                                  # zero latent
    np.testing.assert_array_equal(im[~di], np.asarray(image)[~di])
    # one draw per sample: with p = 1/3 every sample drops something, and r < p drops text only
    _, _, dt3, di3 = hive.dropout_conditioning(jax.random.key(0), text[:100], image[:100], uncond, 1 / 3)
    assert np.all(np.asarray(dt3) | np.asarray(di3))


# --- losses --------------------------------------------------------------------------------------

def _toy_apply(params, x, t, ctx):
    """A tiny 'U-Net': eps = tanh(x @ W) * (1 + t/1000) + mean_L(ctx) @ V."""
    w, v = params["w"], params["v"]
    return jnp.tanh(x @ w) * (1.0 + t[:, None, None, None] / 1000.0) + (ctx.mean(1) @ v)[:, None, None, :]


def _np_apply(params, x, t, ctx):
    w, v = (np.asarray(params[k], np.float64) for k in ("w", "v"))
    return np.tanh(x @ w) * (1.0 + t[:, None, None, None] / 1000.0) + (ctx.mean(1) @ v)[:, None, None, :]


def _toy(seed=0, n=6):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)) * 0.5, jnp.float32),
              "v": jnp.asarray(rng.normal(size=(5, 4)) * 0.1, jnp.float32)}
    data = dict(z0=rng.normal(size=(n, 3, 2, 4)) * 0.2, img=rng.normal(size=(n, 3, 2, 4)),
                ctx=rng.normal(size=(n, 7, 5)), t=rng.integers(0, 1000, n), noise=rng.normal(size=(n, 3, 2, 4)))
    acp = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    return params, {k: np.asarray(v, np.float32) if v.dtype != np.int64 else v.astype(np.int32)
                    for k, v in data.items()}, acp


def _np_loss(params, d, acp):
    a = acp[d["t"]].reshape(-1, 1, 1, 1)
    z_t = np.sqrt(a) * d["z0"] + np.sqrt(1 - a) * d["noise"]
    eps = _np_apply(params, np.concatenate([z_t, d["img"]], -1).astype(np.float64), d["t"], d["ctx"].astype(np.float64))
    return ((eps - d["noise"]) ** 2).mean((1, 2, 3))


def test_denoising_loss_matches_float64_numpy():
    params, d, acp = _toy()
    got = hive.denoising_loss(_toy_apply, params, d["z0"], d["img"], d["ctx"], d["t"], d["noise"],
                              acp.astype(np.float32))
    assert got.shape == (6,)
    np.testing.assert_allclose(np.asarray(got), _np_loss(params, d, acp), rtol=2e-5, atol=1e-7)


def test_weighted_loss_is_per_sample_loss_times_mean_one_weights():
    rng = np.random.default_rng(3)
    per, rewards = rng.uniform(0.1, 2, 8), rng.normal(size=8)
    for eta in (0.1, 1.0, 10.0):
        w = np.exp(rewards / eta) / np.exp(rewards / eta).sum() * 8            # mean 1 over the batch
        loss, got_w = hive.weighted_loss(jnp.asarray(per, jnp.float32), jnp.asarray(rewards, jnp.float32), eta)
        np.testing.assert_allclose(np.asarray(got_w), w, rtol=2e-5)
        np.testing.assert_allclose(float(loss), np.mean(per * w), rtol=2e-5)
        assert abs(float(np.mean(got_w)) - 1.0) < 1e-5
    # equal rewards: the plain loss; huge rewards: no overflow (softmax)
    loss, w = hive.weighted_loss(jnp.asarray(per), jnp.full((8,), 3.0), 0.5)
    np.testing.assert_allclose(float(loss), per.mean(), rtol=1e-6)
    _, w = hive.weighted_loss(jnp.asarray(per), jnp.asarray([1e4, 0, 0, 0, 0, 0, 0, 0.0]), 1.0)
    np.testing.assert_allclose(np.asarray(w), [8, 0, 0, 0, 0, 0, 0, 0], atol=1e-5)


# --- quantisation --------------------------------------------------------------------------------

def test_reward_quantiles_levels_and_instruction_text():
    rewards = np.random.default_rng(0).permutation(np.arange(100.0)) * 0.01 - 0.3
    th = hive.reward_thresholds(rewards)
    np.testing.assert_allclose(th, np.quantile(rewards, [0.2, 0.4, 0.6, 0.8]))
    levels = hive.reward_levels(rewards, th)
    assert sorted(np.bincount(levels)[1:].tolist()) == [20] * 5 and levels.min() == 1 and levels.max() == 5
    # K = 1 + #{thresholds <= R}: a reward equal to a threshold goes up
    assert hive.reward_levels([th[0] - 1e-9, th[0], th[3], 1e9], th).tolist() == [1, 2, 5, 5]
    assert hive.with_quality("make the road white", 3) == "make the road white, image quality is three out of five"
    assert hive.with_quality("Make it snow.") == "Make it snow, image quality is five out of five"
    assert [hive.quality_suffix(k).split()[4] for k in range(1, 6)] == ["one", "two", "three", "four", "five"]
    with pytest.raises(ValueError):
        hive.quality_suffix(6)
    with pytest.raises(ValueError):
        hive.reward_thresholds([])


# --- EMA -----------------------------------------------------------------------------------------

def test_ema_in_optimizer_state_matches_litema_and_skipped_updates_leave_it():
    opt = optax.chain(optax.sgd(0.1), hive.ema_weights(0.9999, warmup=True))
    state = init_train_state({"a": jnp.asarray([1.0, -2.0])}, opt)
    ema, n = np.array([1.0, -2.0]), 0
    for g in ([1.0, 2.0], [0.5, -1.0], [np.nan, 0.0], [2.0, 2.0]):
        grads = {"a": jnp.asarray(g)}
        state, _, skipped = apply_if_finite(state, opt, grads, jnp.float32(1.0))
        if not np.all(np.isfinite(g)):
            assert float(skipped) == 1.0
        else:
            n += 1
            d = min(0.9999, (1 + n) / (10 + n))                                   # LitEma's warm-up
            ema = ema - (1 - d) * (ema - np.asarray(state.params["a"]))
        np.testing.assert_allclose(np.asarray(hive.find_ema(state.opt_state).ema["a"]), ema, rtol=1e-6)
    assert int(hive.find_ema(state.opt_state).count) == 3
    plain = optax.chain(optax.sgd(0.1), hive.ema_weights(0.5, warmup=False))
    s = init_train_state({"a": jnp.zeros(1)}, plain)
    s, _, _ = apply_if_finite(s, plain, {"a": jnp.asarray([-10.0])}, jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(hive.find_ema(s.opt_state).ema["a"]), [0.5])   # 0.5·0 + 0.5·1
    assert hive.find_ema(optax.adam(1e-3).init({"a": jnp.zeros(1)})) is None


# --- augmentation --------------------------------------------------------------------------------

def test_crop_flip_same_for_every_array_and_exact_without_resize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 12, 12, 3)).astype(np.uint8)
    mask = (rng.random((64, 12, 12)) > 0.5).astype(np.float32)
    arrays = {"image": jnp.asarray(image), "edited": jnp.asarray(255 - image), "mask": jnp.asarray(mask)}
    out = hive.random_crop_flip(jax.random.key(0), arrays, 8, 12, 0.5)      # s = 12 always: pure crop + flip
    got, msk = np.asarray(out["image"]), np.asarray(out["mask"])
    flips = 0
    for i in range(64):  # each output is one of the exact crops, flipped or not; mask and edited the same one
        hits = [(y, x, f) for y in range(5) for x in range(5) for f in (0, 1)
                if np.array_equal(got[i], (image[i, y:y + 8, x:x + 8][:, ::-1] if f else image[i, y:y + 8, x:x + 8]))]
        assert hits, i
        y, x, f = hits[0]
        ref = mask[i, y:y + 8, x:x + 8]
        np.testing.assert_array_equal(msk[i], ref[:, ::-1] if f else ref)
        flips += f
    assert 16 < flips < 48
    np.testing.assert_allclose(np.asarray(out["edited"]), 255.0 - got, atol=1e-4)
    # with a random resize (8..12 px) the same linear map still applies to every array of a sample
    out = hive.random_crop_flip(jax.random.key(1), arrays, 8, 8, 0.5)
    np.testing.assert_allclose(np.asarray(out["edited"]), 255.0 - np.asarray(out["image"]), atol=1e-3)
    assert out["image"].shape == (64, 8, 8, 3) and out["mask"].shape == (64, 8, 8)
    with pytest.raises(ValueError, match="min_size"):
        hive.random_crop_flip(jax.random.key(0), arrays, 8, 13)


# --- the update ----------------------------------------------------------------------------------

def test_update_accumulates_the_weighted_loss_gradient_over_micro_batches():
    """make_update with 3 micro-batches = one SGD step on the gradient of the full-batch weighted
    loss, with the same dropout, t and ε as the update draws from its key."""
    params, d, acp = _toy(n=6)
    acp32 = jnp.asarray(acp, jnp.float32)
    uncond = jnp.zeros((7, 5))
    rewards = jnp.asarray([0.1, -0.2, 0.3, 0.0, 1.0, -1.0])
    opt = optax.sgd(1.0)
    step = hive.make_update(_toy_apply, opt, acp32, 1000, micro_batches=3, dropout=0.05)
    batch = hive.SFTBatch(jnp.asarray(d["z0"]), jnp.asarray(d["img"]), jnp.asarray(d["ctx"]), rewards, jnp.float32(0.5))
    key = jax.random.key(7)
    new, m = step(init_train_state(params, opt), None, batch, uncond, key)
    # reference: redo the draws, full batch at once
    k_drop, k_t, k_noise = jax.random.split(key, 3)
    text, image, _, _ = hive.dropout_conditioning(k_drop, batch.text_emb, batch.image_latents, uncond, 0.05)
    t = jax.random.randint(k_t, (6,), 0, 1000)
    noise = jax.random.normal(k_noise, batch.z0.shape)

    def loss(p):
        per = hive.denoising_loss(_toy_apply, p, batch.z0, image, text, t, noise, acp32)
        return hive.weighted_loss(per, rewards, 0.5)[0]
    ref_loss, g = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(float(m["loss"]), float(ref_loss), rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(np.asarray(new.params[k]), np.asarray(params[k] - g[k]), rtol=1e-5, atol=1e-7)
    assert float(m["skipped"]) == 0 and float(m["weight_max"]) > 1
    # eta = 0: unweighted (loss == mse)
    _, m0 = step(init_train_state(params, opt), None, hive.SFTBatch(*[getattr(batch, f) for f in
                                                                     ("z0", "image_latents", "text_emb", "rewards")],
                                                                   jnp.float32(0.0)), uncond, key)
    assert float(m0["loss"]) == pytest.approx(float(m0["mse"]), rel=1e-6) and float(m0["weight_max"]) == 1.0


# --- cycle consistency ---------------------------------------------------------------------------

@pytest.mark.parametrize("instruction, inverse", [
    ("add a dog", "remove the dog"),
    ("Add an owl.", "Remove the owl."),
    ("add snow", "remove snow"),
    ("remove the car", "add the car"),
    ("put a hat on the man", "remove the hat from the man"),
    ("add snow on the road", "remove snow from the road"),
    ("remove the boat from the lake", "add the boat to the lake"),
    ("change the road to a river", "change the river to the road"),
    ("turn the cat into a dog", "turn the dog into the cat"),
    ("replace the apple with an orange", "replace the orange with the apple"),
    ("make the tree bigger", "make the tree smaller"),
    ("make it darker", "make it brighter"),
    ("zoom in", "zoom out"),
    # must NOT invert
    ("add snow and remove the car", None),        # several edits
    ("add birds, then make it night", None),
    ("remove all cars", None),                    # quantifier: how many to add back?
    ("change every window to blue", None),
    ("add more trees", None),
    ("change the color of the car to red", None),  # the original colour is not stated
    ("change the season to winter", None),
    ("turn the sky into a sunset", None),
    ("make the car red", None),                   # no rule: unknown original
    ("make it snowy", None),
    ("do not add a dog", None),                   # negation
    ("", None),
])
def test_cycle_rules(instruction, inverse):
    assert CycleRules().invert(instruction) == inverse


def test_cycle_user_mapping_files_and_augment(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"Make it night": "make it day", "add a dog": None,
                                                 "make the road white": "make the road grey"}))
    rules = CycleRules.from_file(str(tmp_path / "m.json"))
    assert rules.invert("make it night.") == "make it day" and rules.invert("Make It Day") == "Make it night"
    assert rules.invert("add a dog") is None            # the user's null overrides the table
    assert rules.invert("add a cat") == "remove the cat"  # the table still applies
    (tmp_path / "m.tsv").write_text("# inverses\nmake it sunny\tmake it cloudy\nadd a hat\n\n")
    tsv = CycleRules(load_mapping(str(tmp_path / "m.tsv")))
    assert tsv.invert("make it cloudy") == "make it sunny" and tsv.invert("add a hat") is None
    (tmp_path / "bad.tsv").write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        load_mapping(str(tmp_path / "bad.tsv"))
    records = [Triple("in0.png", "m0.png", "add a dog", "out0.png", 0.5),
               Triple("in1.png", None, "make it snowy", "out1.png")]
    out, added = augment(records, CycleRules())
    assert added == 1 and out[:2] == records
    assert out[2] == Triple("out0.png", "m0.png", "remove the dog", "in0.png", None)  # swapped, same mask, no reward
    with pytest.raises(ValueError, match="edited image"):
        augment([Triple("a.png", None, "add a dog")], CycleRules())


# --- data ----------------------------------------------------------------------------------------

def test_edit_triples_index_loader_and_readers(tmp_path):
    path = scenes.write_edit_triples(str(tmp_path / "gen"), 6, seed=2, size=24, graded=True)
    lines = [json.loads(x) for x in open(path)]
    assert all(x["instruction"] == "make the road white" for x in lines)
    image, mask = scenes.road_scene((2, 0, 0), 24)
    edited = read_image(os.path.join(tmp_path, "gen", lines[0]["output"]))
    assert np.array_equal(edited[~mask], image[~mask]) and edited[mask].mean() > image[mask].mean()
    assert lines[0]["reward"] == pytest.approx(scenes.edit_reward(edited, mask)) and -1 < lines[0]["reward"] < 0
    ideal = scenes.road_edit(image, mask)
    assert np.all(ideal[mask] == 255) and scenes.edit_reward(ideal, mask) == 0.0
    # PPO's default never reads outputs; sft asks for them (and rewards)
    assert build_instruction_index(path).outputs == ()
    ix = build_instruction_index(path, with_outputs=True, with_rewards=True)
    assert len(ix.outputs) == 6 and ix.rewards == tuple(x["reward"] for x in lines)
    batch = next(make_loader(index=ix, resolution=24, batch_size=3, seed=0, shuffle=False, num_epochs=1))
    assert set(batch) == {"image", "mask", "index", "edited"} and batch["edited"].shape == (3, 24, 24, 3)
    np.testing.assert_array_equal(batch["edited"][0], edited)
    # a line without a reward / output is named
    bad = tmp_path / "gen" / "bad.jsonl"
    bad.write_text(json.dumps({"input": lines[0]["input"], "mask": None, "instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r'bad.jsonl:1: expected an "output"'):
        build_instruction_index(str(bad), with_outputs=True)
    bad.write_text(json.dumps({**lines[0], "reward": "high"}) + "\n")
    with pytest.raises(DataError, match=r'bad.jsonl:1: expected a finite number "reward"'):
        build_instruction_index(str(bad), with_outputs=True, with_rewards=True)
    # cycle augmentation through the index, with a user mapping for the generated instruction
    rules = CycleRules({"make the road white": "make the road grey"})
    ix = build_instruction_index(path, with_outputs=True, cycle=rules)
    assert len(ix) == 12 and ix.instructions[6:] == ("make the road grey",) * 6
    assert ix.images[6] == ix.outputs[0] and ix.outputs[6] == ix.images[0] and ix.masks[6] == ix.masks[0]
    with pytest.raises(DataError, match="reversed triples have no reward"):
        build_instruction_index(path, with_outputs=True, with_rewards=True, cycle=rules)
    # offline augmentation (python -m jaxedit.data.cycle IN OUT MAPPING), e.g. to score the reversed ones
    from jaxedit.data.cycle import write_augmented
    (tmp_path / "map.json").write_text(json.dumps({"make the road white": "make the road grey"}))
    assert write_augmented(path, str(tmp_path / "aug" / "t.jsonl"), str(tmp_path / "map.json")) == 6
    aug = build_instruction_index(str(tmp_path / "aug" / "t.jsonl"), with_outputs=True)
    assert aug.images == ix.images and aug.instructions == ix.instructions


def test_instructpix2pix_and_magicbrush_layouts_with_outputs(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ip2p"
    (root / "0001").mkdir(parents=True)
    (root / "0002").mkdir()
    (root / "seeds.json").write_text(json.dumps([["0001", [11, 12]], ["0002", [5]]]))
    for d, edit, seeds in (("0001", "turn it into a painting", (11, 12)), ("0002", "add fireworks", (5,))):
        (root / d / "prompt.json").write_text(json.dumps({"input": "a photo", "edit": edit, "output": "a painting"}))
        for s in seeds:
            for k in (0, 1):
                write_image(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), str(root / d / f"{s}_{k}.jpg"))
    ix = build_instruction_index(str(root), with_outputs=True)
    assert ix.instructions == ("turn it into a painting",) * 2 + ("add fireworks",)
    assert [os.path.basename(p) for p in ix.images] == ["11_0.jpg", "12_0.jpg", "5_0.jpg"]
    assert [os.path.basename(p) for p in ix.outputs] == ["11_1.jpg", "12_1.jpg", "5_1.jpg"] and ix.masks == (None,) * 3
    (root / "0002" / "prompt.json").write_text(json.dumps({"input": "x"}))
    with pytest.raises(DataError, match="0002.prompt.json: expected"):
        build_instruction_index(str(root))
    # MagicBrush: outputs only when asked
    mb = tmp_path / "mb"
    (mb / "images" / "7").mkdir(parents=True)
    for f in ("7-input.png", "7-output1.png", "7-mask1.png"):
        write_image(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), str(mb / "images" / "7" / f))
    (mb / "edit_sessions.json").write_text(json.dumps({"7": [{"input": "7-input.png", "output": "7-output1.png",
                                                              "mask": "7-mask1.png", "instruction": "add a hat"}]}))
    assert build_instruction_index(str(mb)).outputs == ()
    assert build_instruction_index(str(mb), with_outputs=True).outputs[0].endswith("7-output1.png")


def test_reward_model_scores_triples(tmp_path):
    pytest.importorskip("torch")
    from jaxedit import reward_model as cli
    from jaxedit.scorers.reward_model import EditRewardModel
    path = scenes.write_edit_triples(str(tmp_path / "gen"), 3, seed=0, size=32)
    EditRewardModel.tiny(seed=0).save(str(tmp_path / "rm"))
    out = tmp_path / "scored" / "r.jsonl"
    assert cli.main(["prog", "score", f"--model={tmp_path / 'rm'}", f"--triples={path}", f"--out={out}"]) == 0
    ix = build_instruction_index(str(out), with_outputs=True, with_rewards=True)   # paths relative to out
    assert len(ix) == 3 and len(set(ix.rewards)) == 3
    model = EditRewardModel.load(str(tmp_path / "rm"))
    direct = model.score([read_image(p) for p in ix.images], list(ix.instructions), [read_image(p) for p in ix.outputs])
    np.testing.assert_allclose(ix.rewards, direct, rtol=1e-5)
    assert cli.main(["prog", "score", f"--model={tmp_path / 'rm'}", f"--triples={path}"]) == 2   # --out needed


def test_hive_configs_share_one_builder():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    import hive_condition
    import hive_sft
    import hive_weighted
    for module, mode in ((hive_sft, "sft"), (hive_weighted, "weighted"), (hive_condition, "condition")):
        c, tiny = module.get_config(), module.get_config("tiny")
        assert (c.method, c.hive.mode, tiny.hive.mode) == ("sft", mode, mode)
        assert (c.train.lr, c.data.resolution, c.hive.resize_max, c.hive.dropout, c.hive.ema_decay) == \
            (1e-4, 256, 288, 0.05, 0.9999)
        assert not c.model.style_adapter and tiny.data.generate > 0 and tiny.workdir.endswith("_tiny")
        assert c.to_dict() == {**hive_sft.build(mode).to_dict()}
    with pytest.raises(ValueError, match="variant"):
        hive_weighted.get_config("huge")
