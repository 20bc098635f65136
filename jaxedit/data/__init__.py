"""Data: image files, folders and datasets at the boundary (uint8 HWC RGB)."""
