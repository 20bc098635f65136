"""Build a tiny, randomly initialised InstructPix2Pix checkpoint in diffusers' on-disk format.

Used by the tests and by the embedded default (`make demo`): nothing binary is committed and
nothing is downloaded. The folder has ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` and a
``model_index.json``, so diffusers' ``StableDiffusionInstructPix2PixPipeline.from_pretrained``
loads it too. Its weights are random: its edits are noise, not edits.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from jaxedit.models import load, text, unet, vae

#: SD-1 / InstructPix2Pix noise schedule (``scheduler/scheduler_config.json`` of the real model).
SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.42.1",
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    "timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": False,
    "skip_prk_steps": True, "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionInstructPix2PixPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
_DONE = ".jaxedit-tiny-complete"


def tiny_configs(vocab_size: int, hidden: int = 32):
    """(unet, vae, text) configs: 8-channel U-Net, 8x-downsampling VAE, 2-layer CLIP text encoder."""
    u = unet.Config(in_channels=8, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), num_attention_heads=4,
                    cross_attention_dim=hidden, norm_num_groups=8, sample_size=32)
    v = vae.Config(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                   latent_channels=4, sample_size=256,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    t = text.Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                    projection_dim=hidden, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                    pad_token_id=vocab_size - 1)
    return u, v, t


def make_tiny_checkpoint(folder: str, seed: int = 0) -> str:
    """Writes the tiny checkpoint to `folder` (once; an existing complete one is reused).

    Every parameter is random (see `load.random_params`). Written to a temporary sibling and
    renamed, so a killed build never leaves a half checkpoint. Returns `folder`.
    """
    if os.path.isfile(os.path.join(folder, _DONE)):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        tokenizer = text.make_tiny_tokenizer(os.path.join(tmp, "tokenizer"))
        u, v, t = tiny_configs(len(tokenizer))
        for sub, cfg, module in (("unet", u, unet.build(u)), ("vae", v, vae.build(v)),
                                 ("text_encoder", t, text.build(t))):
            load.export_model(load.random_params(module, seed=seed + len(sub)), cfg, os.path.join(tmp, sub))
        os.makedirs(os.path.join(tmp, "scheduler"))
        for path, content in ((os.path.join(tmp, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG),
                              (os.path.join(tmp, "model_index.json"), MODEL_INDEX)):
            with open(path, "w") as f:
                json.dump(content, f, indent=2)
        open(os.path.join(tmp, _DONE), "w").close()
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder
