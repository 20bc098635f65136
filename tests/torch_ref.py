"""Helpers for parity tests against the PyTorch reference implementations."""
import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrites every parameter with random values so that no zero init can hide an error.

    Matrices/kernels ~ N(0, 1/fan_in), 1-D weights (norm scales) ~ 1 + N(0, 0.1), biases and
    embeddings ~ N(0, 0.05).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2 and "embedding" not in name:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return module.eval()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(jax_out, torch_out, rel: float = 1e-4):
    """max |jax - torch| <= rel * max |torch| (fp32 parity criterion)."""
    a, b = np.asarray(jax_out, np.float64), np.asarray(torch_out, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err, scale = np.abs(a - b).max(), np.abs(b).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} * max|ref| {scale:.3g}"
    return err / scale
