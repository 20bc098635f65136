"""Flax models that read diffusers / transformers checkpoints: U-Net, VAE, CLIP text encoder."""
