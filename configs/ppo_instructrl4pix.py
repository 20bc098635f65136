"""InstructRL4Pix: PPO with the cross-attention-map reward, LoRA, MagicBrush data (paper Sec. 4, Table 4).

    python -m jaxedit.train --config=configs/ppo_instructrl4pix.py \
        --config.model.checkpoint=/data/instruct-pix2pix-magicbrush --config.data.instructions=/data/MagicBrush/train
    python -m jaxedit.train --config=configs/ppo_instructrl4pix.py:tiny   # embedded tiny RANDOM model, generated triples

Reward r = cos(a_1, a_2) + α·MAE·[MAE > τ], α = −1, a_2 the instruction's cross-attention map
averaged over heads, tokens, the 16x16 layers (latent/4) and the 50 steps, a_1 the MagicBrush
mask. DDPO settings of the paper's Table 4: LoRA (rank 4) on the U-Net attention projections,
AdamW lr 2e-4 (weight decay 1e-4, β 0.9/0.999), 8 samples per epoch (4 GPUs x 2 batches of 1),
50 DDIM steps, η = 1, guidance 5.0 (text; image guidance 1.5), PPO clip 1e-4, advantages clipped
to ±5, per-prompt stat tracker 16/16, every timestep trained, one inner epoch, gradient-norm
clip 1, 200 epochs. The paper's train batch of 1 per GPU on 4 GPUs with no accumulation makes
2 optimizer steps per epoch of 8 samples: here ``train.minibatches = 2`` steps over 4 samples each.
τ is not given in the paper (0.1 here). Expected: the reward rises and the attention map
concentrates on the mask region (paper Fig. 3); with the tiny default nothing is learnt that
means anything (random weights), but the run exercises the whole path in minutes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def get_config(variant: str = ""):
    c = base.get_config()
    c.method = "ppo"
    c.seed = 42
    c.workdir = "runs/ppo_instructrl4pix" + (f"_{variant}" if variant else "")
    c.model.style_adapter = False
    c.edit.segment = ""                 # masks come with the data
    c.data.resolution = 512
    c.sample.steps, c.sample.eta = 50, 1.0
    c.sample.guidance_text, c.sample.guidance_image = 5.0, 1.5
    c.sample.batch_size = 8
    c.train.samples_per_update = 8
    c.train.minibatches = 2
    c.train.micro_batch = 1
    c.train.mode, c.train.lora_rank, c.train.lora_alpha = "lora", 4, 4.0
    c.train.lr, c.train.weight_decay = 2e-4, 1e-4
    c.train.updates = 200
    c.checkpoint.every, c.checkpoint.keep = 50, 5
    if variant == "tiny":
        c.data.generate, c.data.resolution = 32, 64
        c.sample.steps = 6
        c.train.samples_per_update, c.train.minibatches, c.train.micro_batch = 8, 1, 4
        c.train.updates = 20
        c.reward.attention_downsample = 1   # the tiny U-Net attends at the full latent size (8x8)
        c.eval.every, c.eval.generate = 5, 8
        c.checkpoint.every = 10
        c.log.images_every = 10
    elif variant:
        raise ValueError(f"unknown config variant {variant!r} (known: tiny)")
    return c
