"""Line plots as SVG text and PNG files without matplotlib (NumPy-free; PIL for the PNG).

    svg = line_plot(series, xlabel="L2 ↓", ylabel="CLIP-T ↑", title="guidance_image sweep")
    write_plot(series, "plot", ...)   # plot.svg + plot.png

``series``: ``[(label, [(x, y, point_label), ...]), ...]``, one line per series in the given
order of its points; non-finite points are dropped. Both renderers draw the same primitives
(lines, circles, text), laid out once by `_layout`.
"""
from __future__ import annotations

import html
import math
import os
import tempfile

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
WIDTH, HEIGHT = 640, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 190, 40, 55


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi - lo <= 0:
        lo, hi = lo - (abs(lo) or 1) * 0.05, hi + (abs(hi) or 1) * 0.05
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    count = max(1, math.ceil((hi - start) / step - 1e-9))
    return [round(start + k * step, 12) for k in range(count + 1)]  # first <= lo, last >= hi


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _layout(series, xlabel: str, ylabel: str, title: str) -> list[tuple]:
    """Primitives: ("line", x1, y1, x2, y2, colour, width), ("circle", x, y, r, colour),
    ("text", x, y, string, size, anchor, colour) in pixels, y down."""
    pts = [[(x, y, lab) for x, y, lab in s if math.isfinite(x) and math.isfinite(y)] for _, s in series]
    xs = [p[0] for s in pts for p in s] or [0.0, 1.0]
    ys = [p[1] for s in pts for p in s] or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    px = lambda v: _LEFT + (v - x0) / ((x1 - x0) or 1) * pw
    py = lambda v: _TOP + ph - (v - y0) / ((y1 - y0) or 1) * ph
    ops: list[tuple] = [("text", WIDTH / 2, 22, title, 15, "middle", "#000")]
    for v in xt:
        ops += [("line", px(v), _TOP, px(v), _TOP + ph, "#e5e5e5", 1),
                ("text", px(v), _TOP + ph + 16, _fmt(v), 11, "middle", "#333")]
    for v in yt:
        ops += [("line", _LEFT, py(v), _LEFT + pw, py(v), "#e5e5e5", 1),
                ("text", _LEFT - 6, py(v) + 4, _fmt(v), 11, "end", "#333")]
    ops += [("line", _LEFT, _TOP + ph, _LEFT + pw, _TOP + ph, "#000", 1), ("line", _LEFT, _TOP, _LEFT, _TOP + ph, "#000", 1),
            ("text", _LEFT + pw / 2, HEIGHT - 12, xlabel, 13, "middle", "#000"),
            ("text", 14, _TOP - 10, ylabel, 13, "start", "#000")]
    for k, ((label, _), s) in enumerate(zip(series, pts)):
        colour = PALETTE[k % len(PALETTE)]
        for (xa, ya, _), (xb, yb, _) in zip(s, s[1:]):
            ops.append(("line", px(xa), py(ya), px(xb), py(yb), colour, 2))
        for x, y, lab in s:
            ops.append(("circle", px(x), py(y), 3.5, colour))
            if lab:
                ops.append(("text", px(x) + 5, py(y) - 5, lab, 9, "start", colour))
        ly = _TOP + 10 + 18 * k
        ops += [("line", WIDTH - _RIGHT + 12, ly, WIDTH - _RIGHT + 32, ly, colour, 2),
                ("text", WIDTH - _RIGHT + 38, ly + 4, label, 11, "start", "#000")]
    return ops


def line_plot(series, *, xlabel: str = "", ylabel: str = "", title: str = "") -> str:
    """An SVG document (text) of the line plot."""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Arial, sans-serif">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>']
    for op in _layout(series, xlabel, ylabel, title):
        if op[0] == "line":
            _, xa, ya, xb, yb, c, w = op
            out.append(f'<line x1="{xa:.1f}" y1="{ya:.1f}" x2="{xb:.1f}" y2="{yb:.1f}" stroke="{c}" stroke-width="{w}"/>')
        elif op[0] == "circle":
            _, x, y, r, c = op
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{c}"/>')
        else:
            _, x, y, s, size, anchor, c = op
            out.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                       f'fill="{c}">{html.escape(str(s))}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def render_png(series, path: str, *, xlabel: str = "", ylabel: str = "", title: str = "") -> None:
    """The same plot as a PNG file (PIL), written atomically."""
    from PIL import Image, ImageDraw, ImageFont
    scale = 2  # drawn at 2x for legible text
    im = Image.new("RGB", (WIDTH * scale, HEIGHT * scale), "white")
    draw = ImageDraw.Draw(im)
    fonts: dict[int, object] = {}
    for op in _layout(series, xlabel, ylabel, title):
        if op[0] == "line":
            _, xa, ya, xb, yb, c, w = op
            draw.line([(xa * scale, ya * scale), (xb * scale, yb * scale)], fill=c, width=int(w * scale))
        elif op[0] == "circle":
            _, x, y, r, c = op
            draw.ellipse([(x - r) * scale, (y - r) * scale, (x + r) * scale, (y + r) * scale], fill=c)
        else:
            _, x, y, s, size, anchor, c = op
            font = fonts.setdefault(size, ImageFont.load_default(size * scale))
            pil_anchor = {"start": "ls", "middle": "ms", "end": "rs"}[anchor]
            draw.text((x * scale, y * scale), str(s), fill=c, font=font, anchor=pil_anchor)
    _atomic(path, lambda tmp: im.save(tmp, format="PNG"))


def write_plot(series, stem: str, **labels) -> tuple[str, str]:
    """Writes ``stem.svg`` and ``stem.png``; returns their paths."""
    svg = line_plot(series, **labels)
    write_text(stem + ".svg", svg)
    render_png(series, stem + ".png", **labels)
    return stem + ".svg", stem + ".png"


def write_text(path: str, text: str) -> None:
    """Writes a UTF-8 text file atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(path, write)


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
