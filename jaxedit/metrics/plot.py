"""Trade-off line plots with matplotlib (Agg backend, no display): SVG text and PNG files.

    svg = line_plot(series, xlabel="L2 ↓", ylabel="CLIP-T ↑", title="guidance_image sweep")
    write_plot(series, "plot", ...)   # plot.svg + plot.png

``series``: ``[(label, [(x, y, point_label), ...]), ...]``, one line per series in the given
order of its points (each point annotated with its label, e.g. the sweep value); non-finite
points are dropped. Files are written atomically.
"""
from __future__ import annotations

import io
import math
import os
import tempfile

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

matplotlib.rcParams["svg.hashsalt"] = "jaxedit"  # stable SVG ids: reruns write identical files
matplotlib.rcParams["svg.fonttype"] = "none"    # text stays text in the SVG (searchable, smaller)


def _figure(series, xlabel: str, ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=100)
    for label, points in series:
        pts = [(x, y, p) for x, y, p in points if math.isfinite(x) and math.isfinite(y)]
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y, p in pts:
            ax.annotate(p, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(points for _, points in series):
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def line_plot(series, *, xlabel: str = "", ylabel: str = "", title: str = "") -> str:
    """An SVG document (text) of the line plot."""
    fig = _figure(series, xlabel, ylabel, title)
    buf = io.StringIO()
    try:
        fig.savefig(buf, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def render_png(series, path: str, *, xlabel: str = "", ylabel: str = "", title: str = "") -> None:
    """The same plot as a PNG file (2x resolution)."""
    fig = _figure(series, xlabel, ylabel, title)
    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=200))
    finally:
        plt.close(fig)


def write_plot(series, stem: str, **labels) -> tuple[str, str]:
    """Writes ``stem.svg`` and ``stem.png``; returns their paths."""
    write_text(stem + ".svg", line_plot(series, **labels))
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
