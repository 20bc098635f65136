"""jaxedit: instruction-based image editing diffusion models in JAX, fine-tuned with RL."""
__version__ = "0.1.0"
