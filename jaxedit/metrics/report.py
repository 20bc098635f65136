"""Evaluation outputs: ``metrics.csv``, ``table.md``, ``report.html`` and trade-off plots.

- ``metrics.csv``: one row per checkpoint x setting x image (`write_csv`);
- ``table.md``: means per checkpoint x setting in the papers' layout (one row per model, one column
  per metric with ↑ / ↓ for higher / lower is better), the best value of each column in **bold**
  (`markdown_table`; NaN values are left out of a mean, an all-NaN column shows "–");
- ``plots/tradeoff_<param>_<x>_vs_<y>.svg|png`` for each swept parameter with two or more values:
  input consistency (x: L2, Depth_all) vs edit / style consistency (y: CLIP-T, CLIP-dir, STY_in),
  one line per checkpoint (and per value of the other swept parameters), points labelled with the
  swept value (`trade_off_plots`; as the Specialists' Figures 3 and 5);
- ``report.html``: self-contained (no external files): the table, the plots as inline SVG, and
  image grids input | style | target | each checkpoint x setting as embedded PNG thumbnails.

NumPy + PIL only (no jax, no torch, no matplotlib: `jaxedit.metrics.plot` draws the plots).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from typing import Sequence

import numpy as np

from jaxedit.metrics import plot
from jaxedit.metrics.compute import HIGHER_IS_BETTER, LABELS

X_METRICS = ("l2", "depth_all")                 # input consistency (lower is better)
Y_METRICS = ("clip_t", "clip_dir", "sty_in")    # edit / style consistency (higher is better)


def label(metric: str) -> str:
    return f"{LABELS.get(metric, metric)} {'↑' if metric in HIGHER_IS_BETTER else '↓'}"


def fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if isinstance(r.get(c), float) and not math.isfinite(r[c]) else
                    (f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in columns])
    plot.write_text(path, buf.getvalue())


def summarize(rows: Sequence[dict], metrics: Sequence[str], keys=("checkpoint", "setting")) -> list[dict]:
    """Mean of each metric per group of `keys` (NaN left out), in first-seen order; ``n`` = rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for rs in groups.values():
        s = {k: v for k, v in rs[0].items() if k not in metrics and k != "image"}
        s["n"] = len(rs)
        for m in metrics:
            v = np.asarray([r.get(m, math.nan) for r in rs], np.float64)
            s[m] = float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else math.nan
        out.append(s)
    return out


def best(summary: Sequence[dict], metric: str) -> set[int]:
    """Indices of the rows holding the column's best (max if higher is better, else min)."""
    vals = [(i, s[metric]) for i, s in enumerate(summary) if math.isfinite(s[metric])]
    if not vals:
        return set()
    target = (max if metric in HIGHER_IS_BETTER else min)(v for _, v in vals)
    return {i for i, v in vals if abs(v - target) <= 1e-12 * max(1.0, abs(target))}


def _name_columns(summary) -> list[str]:
    return ["checkpoint"] + (["setting"] if len({s["setting"] for s in summary}) > 1 else [])


def markdown_table(summary: Sequence[dict], metrics: Sequence[str]) -> str:
    names = _name_columns(summary)
    marks = {m: best(summary, m) for m in metrics}
    lines = ["| " + " | ".join([n.capitalize() for n in names] + [label(m) for m in metrics]) + " |",
             "|" + "---|" * len(names) + "---:|" * len(metrics)]
    for i, s in enumerate(summary):
        cells = [str(s[n]) for n in names]
        cells += [f"**{fmt(s[m])}**" if i in marks[m] else fmt(s[m]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def html_table(summary: Sequence[dict], metrics: Sequence[str]) -> str:
    names = _name_columns(summary)
    marks = {m: best(summary, m) for m in metrics}
    head = "".join(f"<th>{html.escape(n.capitalize())}</th>" for n in names)
    head += "".join(f"<th>{html.escape(label(m))}</th>" for m in metrics)
    body = []
    for i, s in enumerate(summary):
        cells = "".join(f"<td>{html.escape(str(s[n]))}</td>" for n in names)
        cells += "".join(f'<td class="num">{"<b>" + fmt(s[m]) + "</b>" if i in marks[m] else fmt(s[m])}</td>'
                         for m in metrics)
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def trade_off_plots(summary: Sequence[dict], sweeps: dict[str, list[float]], metrics: Sequence[str],
                    folder: str) -> list[dict]:
    """Writes the trade-off plots; returns [{"title", "svg", "png", "svg_text"}]."""
    out = []
    xs = [m for m in X_METRICS if m in metrics]
    ys = [m for m in Y_METRICS if m in metrics]
    for param, values in sweeps.items():
        if len(values) < 2:
            continue
        others = [p for p in sweeps if p != param]
        for x in xs:
            for y in ys:
                lines: dict[str, list] = {}
                for s in summary:
                    key = s["checkpoint"] + ("".join(f" ({p}={s[p]:g})" for p in others) if others else "")
                    lines.setdefault(key, []).append((s[param], s[x], s[y]))
                series = [(k, [(px, py, f"{v:g}") for v, px, py in sorted(pts)]) for k, pts in lines.items()]
                title = f"{param} sweep: {LABELS[x]} vs {LABELS[y]}"
                stem = os.path.join(folder, f"tradeoff_{param}_{x}_vs_{y}")
                kw = dict(xlabel=f"{LABELS[x]} (input consistency, lower is better)",
                          ylabel=f"{LABELS[y]} (higher is better)", title=title)
                svg, png = plot.write_plot(series, stem, **kw)
                out.append({"title": title, "svg": svg, "png": png, "svg_text": plot.line_plot(series, **kw)})
    return out


def thumbnail(path: str | None, size: int = 160) -> str:
    """A PNG data URI of the image at `path`, longer side `size`; "" for None."""
    if not path:
        return ""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_grid(grid: Sequence[dict]) -> str:
    """grid: [{"name", "input", "style", "target", "edits": [(column label, path)]}] -> an HTML table."""
    if not grid:
        return ""
    fixed = [c for c in ("input", "style", "target") if any(g.get(c) for g in grid)]
    labels = [lab for lab, _ in grid[0]["edits"]]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["image"] + fixed + labels)
    rows = []
    for g in grid:
        cells = [f"<td>{html.escape(g['name'])}</td>"]
        for path in [g.get(c) for c in fixed] + [p for _, p in g["edits"]]:
            cells.append(f'<td><img src="{thumbnail(path)}" alt=""></td>' if path and os.path.exists(path)
                         else "<td>–</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid img{display:block;width:128px;height:auto}.scroll{overflow-x:auto}figure{margin:1em 0}"""


def write_html(path: str, summary, metrics, plots: Sequence[dict], grid: Sequence[dict], meta: dict) -> None:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>jaxedit evaluation</title>"
             f"<style>{CSS}</style></head><body><h1>Evaluation</h1>",
             "<ul>" + "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                              for k, v in meta.items()) + "</ul>",
             "<h2>Means</h2>", f'<div class="scroll">{html_table(summary, metrics)}</div>',
             "<p>↑ higher is better, ↓ lower is better; best per column in bold.</p>"]
    if plots:
        parts.append("<h2>Trade-off</h2>")
        parts += [f"<figure>{p['svg_text']}<figcaption>{html.escape(p['title'])} "
                  f"({html.escape(os.path.basename(p['png']))})</figcaption></figure>" for p in plots]
    if grid:
        parts += ["<h2>Images</h2>", f'<div class="scroll">{image_grid(grid)}</div>']
    plot.write_text(path, "\n".join(parts + ["</body></html>"]) + "\n")


def write_report(out: str, rows: Sequence[dict], metrics: Sequence[str], *, columns: Sequence[str],
                 sweeps: dict[str, list[float]], grid: Sequence[dict] = (), meta: dict | None = None) -> dict:
    """Writes metrics.csv, table.md, plots/ and report.html under `out`; returns their paths."""
    write_csv(os.path.join(out, "metrics.csv"), rows, list(columns) + list(metrics))
    summary = summarize(rows, metrics)
    plot.write_text(os.path.join(out, "table.md"), markdown_table(summary, metrics))
    plots = trade_off_plots(summary, sweeps, metrics, os.path.join(out, "plots"))
    write_html(os.path.join(out, "report.html"), summary, metrics, plots, grid, meta or {})
    return {"csv": os.path.join(out, "metrics.csv"), "table": os.path.join(out, "table.md"),
            "html": os.path.join(out, "report.html"), "plots": [p for q in plots for p in (q["svg"], q["png"])]}
