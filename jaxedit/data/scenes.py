"""Synthetic training data shipped as code: road scenes with exact road masks, style textures.

For the tiny default configs (`configs/d3po_snow.py:tiny`, `configs/ppo_instructrl4pix.py:tiny`,
`configs/hive_*.py:tiny`: edit triples, `write_edit_triples`) and tests. NumPy only, deterministic:
scene i depends only on (seed, i, size) and style image j on (seed, style, j, size), never on how
many are generated. `write_dataset` writes them as PNG files so the same folder-based loader
(`jaxedit.data.loader`) serves generated and real data.

Scene: sky gradient, a horizon in [0.35, 0.5] of the height, distant hills, grass, a road in
perspective (random vanishing point, width, curve, grey tone, dashed centre line, edge lines)
and 0-2 cars (rectangles with a window strip). The mask is exactly the visible road pixels
(markings included, cars excluded): everything is drawn without anti-aliasing from the same
pixel-centre tests as the mask.

Styles (`STYLES`): snow (white/bluish noise with sparkle), snow_sparse (grey asphalt with white
tyre-track stripes), rain (dark wet asphalt, streaks, puddle reflections), sand (beige ripples
with grain), gold (metallic yellow with highlights), wood (planks with grain rings), night
(dark blue with warm lights and stars). Each is a parametric texture whose parameters vary by seed.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from jaxedit.data.images import write_image

STYLES = ("snow", "snow_sparse", "rain", "sand", "gold", "wood", "night")


def _noise(rng: np.random.Generator, size: int, cells: int | tuple[int, int]) -> np.ndarray:
    """Smooth value noise in [0, 1], (size, size): a random (cy+1, cx+1) grid, bilinear-upsampled."""
    cy, cx = (int(cells), int(cells)) if np.ndim(cells) == 0 else map(int, cells)
    grid = rng.random((cy + 1, cx + 1))
    y = (np.arange(size) + 0.5) / size * cy
    x = (np.arange(size) + 0.5) / size * cx
    y0, x0 = np.minimum(y.astype(int), cy - 1), np.minimum(x.astype(int), cx - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)      # smoothstep
    g = grid
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    bot = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (v down, u right) in [0, 1], each (size, size)."""
    c = (np.arange(size) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def road_scene(seed: int | tuple, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One road scene: (uint8 (size, size, 3) RGB image, bool (size, size) exact road mask)."""
    rng = np.random.default_rng(seed)
    v, u = _grid(size)
    horizon = rng.uniform(0.35, 0.5)
    img = np.zeros((size, size, 3))

    sky_top, sky_low = rng.uniform([0.2, 0.4, 0.7], [0.5, 0.65, 0.95]), rng.uniform(0.75, 0.95, 3)
    a = np.clip(v / horizon, 0, 1)[..., None]
    img[:] = sky_top * (1 - a) + sky_low * a
    hills = horizon - rng.uniform(0.02, 0.08) * _noise(rng, size, (1, 4))[0]
    hill_px = (v < horizon) & (v >= hills[None, :])
    img[hill_px] = rng.uniform([0.15, 0.3, 0.15], [0.3, 0.45, 0.3])

    ground = v >= horizon
    grass = rng.uniform([0.2, 0.4, 0.1], [0.35, 0.6, 0.25]) * (0.8 + 0.4 * _noise(rng, size, 12))[..., None]
    img[ground] = grass[ground]

    t = np.clip((v - horizon) / (1 - horizon), 0, 1)           # 0 at the horizon, 1 at the bottom
    vx, bx = rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.7)
    curve = rng.uniform(-0.4, 0.4)
    centre = vx + (bx - vx) * t + curve * t * (1 - t)
    half0, half1 = rng.uniform(0.005, 0.02), rng.uniform(0.25, 0.55)
    half = half0 + half1 * t
    off = np.abs(u - centre)
    road = ground & (off < half)
    grey = rng.uniform(0.25, 0.55)
    tone = grey * rng.uniform(0.92, 1.08, 3) * (0.94 + 0.12 * _noise(rng, size, 24))[..., None]
    img[road] = tone[road]

    line_w = 0.004 + 0.012 * t
    dashes = np.mod(rng.uniform(2.0, 4.0) / (t + 0.08), 1.0) < 0.5
    centre_line = road & (off < line_w) & dashes
    img[centre_line] = rng.choice([[0.95, 0.95, 0.9], [0.95, 0.8, 0.2]])
    img[road & (off > half - line_w)] = 0.9

    cars = np.zeros_like(road)
    for _ in range(rng.integers(0, 3)):
        tc = rng.uniform(0.3, 0.9)
        vb = horizon + tc * (1 - horizon)
        half_c = half0 + half1 * tc                              # road half-width at the car
        hw_c = rng.uniform(0.25, 0.4) * half_c
        cc = vx + (bx - vx) * tc + curve * tc * (1 - tc) + rng.choice([-1, 1]) * 0.45 * half_c
        height = rng.uniform(0.6, 0.9) * hw_c * 2
        body = (v >= vb - height) & (v < vb) & (np.abs(u - cc) < hw_c)
        img[body] = rng.uniform(0.1, 0.9, 3)
        img[body & (v < vb - 0.6 * height) & (np.abs(u - cc) < 0.8 * hw_c)] = [0.15, 0.2, 0.25]
        cars |= body
    return _to_uint8(img), road & ~cars


def style_image(style: str, seed: int | tuple, size: int = 256) -> np.ndarray:
    """One procedurally generated style image ("visual style prompt"): uint8 (size, size, 3)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    rng = np.random.default_rng(seed)
    v, u = _grid(size)
    n = lambda cells: _noise(rng, size, cells)  # noqa: E731
    if style == "snow":
        base = 0.8 + 0.12 * n(rng.integers(3, 6)) + 0.06 * n(rng.integers(12, 24))
        img = base[..., None] * rng.uniform([0.88, 0.92, 0.98], [0.94, 0.96, 1.0])
        img[rng.random((size, size)) < rng.uniform(0.005, 0.02)] = 1.0
    elif style == "snow_sparse":
        img = np.repeat((0.28 + 0.1 * n(16))[..., None], 3, -1)
        angle = rng.uniform(-0.3, 0.3)
        stripes = np.sin(2 * np.pi * (rng.uniform(4, 9) * (u + angle * v) + 0.4 * n(3)))
        snow = np.clip((stripes - rng.uniform(0.2, 0.6)) * 3, 0, 1) * (0.7 + 0.3 * n(20))
        img = img * (1 - snow[..., None]) + snow[..., None] * [0.92, 0.95, 1.0]
    elif style == "rain":
        img = np.repeat((0.14 + 0.08 * n(12))[..., None], 3, -1) * [0.95, 1.0, 1.1]
        streaks = _noise(rng, size, (2, size // 2))
        img += 0.15 * np.clip(streaks - 0.6, 0, 1)[..., None] * 2.5
        puddle = n(4) > rng.uniform(0.55, 0.7)
        img[puddle] = img[puddle] * 0.4 + 0.45 * np.array([0.6, 0.68, 0.78])
    elif style == "sand":
        ripples = np.sin(2 * np.pi * (rng.uniform(6, 14) * v + 0.5 * n(3)))
        shade = 0.85 + 0.08 * ripples + 0.05 * n(8) + rng.normal(0, 0.035, (size, size))
        img = shade[..., None] * rng.uniform([0.8, 0.66, 0.44], [0.9, 0.76, 0.55])
    elif style == "gold":
        light = 0.5 + 0.5 * n(rng.integers(2, 5)) ** 2 + 0.1 * np.sin(2 * np.pi * 3 * (u + v))
        img = light[..., None] * rng.uniform([0.95, 0.72, 0.15], [1.0, 0.82, 0.3])
        img[n(6) > 0.8] = [1.0, 0.95, 0.7]
    elif style == "wood":
        planks = rng.integers(4, 8)
        row = np.minimum((v * planks).astype(int), planks - 1)
        tint = rng.uniform(0.8, 1.15, planks)[row]
        grain = 0.85 + 0.15 * np.sin(2 * np.pi * (rng.uniform(2, 5) * u + 4 * n((planks * 2, 3)) + row * 0.37))
        img = (tint * grain)[..., None] * rng.uniform([0.5, 0.3, 0.14], [0.62, 0.4, 0.22])
        img[np.mod(v * planks, 1.0) < 0.06] *= 0.4
    else:  # night
        img = (0.6 + 0.4 * n(6))[..., None] * rng.uniform([0.02, 0.03, 0.08], [0.05, 0.06, 0.16])
        for _ in range(rng.integers(2, 6)):
            cy, cx, r = rng.uniform(0.2, 0.9), rng.uniform(0, 1), rng.uniform(0.03, 0.1)
            glow = np.exp(-((v - cy) ** 2 + (u - cx) ** 2) / (2 * r * r))
            img += glow[..., None] * [0.9, 0.6, 0.25]
        img[rng.random((size, size)) < 0.003] = 0.9
    return _to_uint8(img)


def _clear(folder: str, pattern: str) -> None:
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if re.fullmatch(pattern, f):
                os.remove(os.path.join(folder, f))


def write_dataset(folder: str, n_images: int, n_styles: int = 5, style: str = "snow", seed: int = 0,
                  size: int = 256) -> dict[str, str]:
    """Writes generated scenes, road masks and style images as PNG; returns their folders.

    Layout: `folder/images/scene_0000.png`, `folder/masks/scene_0000.png` (white = road, 0/255),
    `folder/styles/<style>/<style>_00.png`. Generated files left over from an earlier, larger
    call are removed (only names this function writes); other files are not touched.
    Returns {"images": ..., "masks": ..., "styles": ...} for `make_loader`.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    out = {"images": os.path.join(folder, "images"), "masks": os.path.join(folder, "masks"),
           "styles": os.path.join(folder, "styles", style)}
    _clear(out["images"], r"scene_\d+\.png")
    _clear(out["masks"], r"scene_\d+\.png")
    _clear(out["styles"], re.escape(style) + r"_\d+\.png")
    for i in range(n_images):
        image, mask = road_scene((seed, 0, i), size)
        write_image(image, os.path.join(out["images"], f"scene_{i:04d}.png"))
        write_image(mask.astype(np.uint8) * 255, os.path.join(out["masks"], f"scene_{i:04d}.png"))
    for j in range(n_styles):
        write_image(style_image(style, (seed, 1, STYLES.index(style), j), size),
                    os.path.join(out["styles"], f"{style}_{j:02d}.png"))
    return out


#: Instructions of the generated triples (`write_triples`), cycled over the scenes; the mask is
#: the road for all of them.
INSTRUCTIONS = ("make the road white", "paint the road red", "turn the road into gold", "cover the road with sand")


def write_triples(folder: str, n_images: int, instructions: tuple[str, ...] = INSTRUCTIONS, seed: int = 0,
                  size: int = 256) -> str:
    """Writes generated scenes and road masks (`write_dataset`) and ``folder/triples.jsonl`` with
    one {"input", "mask", "instruction"} line per scene (instruction i mod len); returns its path."""
    write_dataset(folder, n_images, n_styles=0, seed=seed, size=size)
    path = os.path.join(folder, "triples.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_images):
            f.write(json.dumps({"input": f"images/scene_{i:04d}.png", "mask": f"masks/scene_{i:04d}.png",
                                "instruction": instructions[i % len(instructions)]}) + "\n")
    return path


#: The instruction of the generated edit triples (`write_edit_triples`).
EDIT_INSTRUCTION = "make the road white"
WHITE = np.array([255.0, 255.0, 255.0])


def road_edit(image: np.ndarray, mask: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """The analytic edit "make the road white": road pixels blended towards white by ``strength``
    (1 = pure white road, 0 = unchanged); the rest of the image unchanged. uint8 (H, W, 3)."""
    out = image.astype(np.float64)
    out[mask] = (1.0 - strength) * out[mask] + strength * WHITE
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def edit_reward(edited: np.ndarray, mask: np.ndarray) -> float:
    """Analytic reward of an edit: minus the mean |edited − white| / 255 over the road pixels and
    channels (0 for the ideal edit, about −(1 − strength)·(1 − grey) otherwise)."""
    if not mask.any():
        return 0.0
    return -float(np.mean(np.abs(edited[mask].astype(np.float64) - WHITE)) / 255.0)


def write_edit_triples(folder: str, n_images: int, *, seed: int = 0, size: int = 256, graded: bool = False,
                       instruction: str = EDIT_INSTRUCTION) -> str:
    """Writes (input, mask, instruction, edited) triples of generated scenes for supervised / HIVE
    training and ``folder/triples.jsonl``; returns its path.

    Inputs and masks as `write_dataset`; ``folder/outputs/scene_0000.png`` is the scene with its
    road painted white (`road_edit`). ``graded``: scene i's edit has a strength drawn uniformly
    in [0.25, 1] (from (seed, 2, i)) instead of 1, so edits differ in quality. Every line has
    an analytic ``"reward"`` (`edit_reward`: 0 = ideal) for the HIVE reward losses; no torch needed.
    """
    write_dataset(folder, n_images, n_styles=0, seed=seed, size=size)
    outputs = os.path.join(folder, "outputs")
    _clear(outputs, r"scene_\d+\.png")
    path = os.path.join(folder, "triples.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_images):
            image, mask = road_scene((seed, 0, i), size)
            strength = float(np.random.default_rng((seed, 2, i)).uniform(0.25, 1.0)) if graded else 1.0
            edited = road_edit(image, mask, strength)
            write_image(edited, os.path.join(outputs, f"scene_{i:04d}.png"))
            f.write(json.dumps({"input": f"images/scene_{i:04d}.png", "mask": f"masks/scene_{i:04d}.png",
                                "instruction": instruction, "output": f"outputs/scene_{i:04d}.png",
                                "reward": edit_reward(edited, mask)}) + "\n")
    return path
