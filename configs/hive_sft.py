"""Supervised instruction training (HIVE step 1, InstructPix2Pix recipe); `build` is shared by
`hive_weighted.py` and `hive_condition.py` (HIVE step 3).

    python -m jaxedit.train --config=configs/hive_sft.py --config.model.checkpoint=/data/ip2p-init \
        --config.data.instructions=/data/train_triples.jsonl \
        --config.eval.instructions=/data/val.jsonl --config.eval.every=500     # held-out edits vs targets
    python -m jaxedit.train --config=configs/hive_sft.py:tiny     # embedded tiny RANDOM model, generated triples

Settings (HIVE App. B.1: lr 1e-4, 256 px; InstructPix2Pix: AdamW, batch 1024, 10k steps, resize
256-288 px + random 256 crop + flips, conditioning dropout 5 % / 5 % / 5 %, EMA 0.9999): full
fine-tuning of an 8-channel InstructPix2Pix U-Net, AdamW lr 1e-4 (weight decay 0.01, torch's
AdamW default used by InstructPix2Pix), gradient-norm clip 1, 1024 examples per update in
micro-batches of 32, the EMA of the weights evaluated and saved. HIVE trains 500 epochs of its
1.1M + 281K triples; set ``train.updates`` for your data. Held-out edits: DDIM 20 steps, η = 0,
guidance 7.5 / 1.5.

Tiny variant: generated road scenes whose edit is "make the road white" (`scenes.write_edit_triples`,
64 px, crops from 64-72 px), lr 1e-3 (the tiny random model), z_0 from the VAE posterior mode
(the random VAE's posterior std is ~1, which would drown the edit), 30 updates of 16; the reward
variants get graded edits with the analytic reward (0 = ideal white road, no torch).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def build(mode: str = "sft", variant: str = ""):
    """The supervised / HIVE config for ``hive.mode = mode`` (sft | weighted | condition)."""
    c = base.get_config()
    c.method = "sft"
    c.hive.mode = mode
    c.seed = 0
    c.workdir = f"runs/hive_{mode}" + (f"_{variant}" if variant else "")
    c.model.style_adapter = False
    c.edit.segment = ""
    c.data.resolution = 256
    c.hive.resize_min, c.hive.resize_max, c.hive.flip_prob = 256, 288, 0.5
    c.hive.encode_batch = 128           # examples per loading/encoding call (and held-out batch)
    c.train.mode = "full"
    c.train.lr, c.train.weight_decay, c.train.max_grad_norm = 1e-4, 1e-2, 1.0
    c.train.samples_per_update, c.train.micro_batch = 1024, 32
    c.train.updates = 10_000
    c.sample.steps, c.sample.eta = 20, 0.0
    c.sample.guidance_text, c.sample.guidance_image = 7.5, 1.5
    c.sample.batch_size = 16
    c.eval.every = 0                    # held-out edits need eval.instructions (triples with outputs)
    c.checkpoint.every, c.checkpoint.keep = 500, 3
    c.log.images_every = 100
    if variant == "tiny":
        c.data.generate, c.data.resolution = 32, 64
        c.hive.resize_min, c.hive.resize_max = 64, 72
        c.hive.encode_batch = 8         # also the held-out batch
        c.hive.eta = 0.2                # analytic rewards lie in about [-0.6, 0]
        c.hive.vae_sample = False       # the random tiny VAE's posterior std is ~1 (a trained one's is tiny)
        c.train.samples_per_update, c.train.micro_batch = 16, 8
        c.train.lr = 1e-3
        c.train.updates = 30
        c.sample.steps = 10
        c.eval.every, c.eval.generate = 10, 8
        c.checkpoint.every = 10
        c.log.images_every = 10
    elif variant:
        raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
    return c


def get_config(variant: str = ""):
    return build("sft", variant)
