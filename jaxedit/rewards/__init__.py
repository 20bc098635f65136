"""JAX-side rewards (higher is better): InstructRL4Pix's attention-map and clipped-MAE terms."""
from jaxedit.rewards.attention import attention_reward, cosine, mask_to_map
from jaxedit.rewards.pixel import clipped_mae, mae

__all__ = ["attention_reward", "clipped_mae", "cosine", "mae", "mask_to_map"]
