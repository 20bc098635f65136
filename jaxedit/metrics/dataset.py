"""Evaluation data for `jaxedit.evaluate`: one `Item` per image to edit (input, instruction, and
where given its mask, style image, target image and captions).

- a folder of images (names = file stems), ``masks``: a folder of masks of the same stems (white =
  edit region), ``styles``: a folder of style images (the one of the same stem, else assigned
  round-robin in name order);
- ``captions`` (`read_captions`): JSON ``{name: caption}`` / ``{name: {"output", "input",
  "instruction"}}``, or CSV with columns ``name, output[, input, instruction]``; the output caption
  is CLIP-T's, the input caption directional CLIP's; an instruction here overrides the common one;
- ``magicbrush``: a MagicBrush split folder (``edit_sessions.json``, `jaxedit.data.instructions`):
  every turn from its shipped input (the single-turn setting), its target image, its mask, and its
  CLIP-T caption from ``local_descriptions.json`` (``{img_id: {output file: caption}}``) when present.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


@dataclasses.dataclass
class Item:
    name: str
    input: str
    instruction: str | None = None
    mask: str | None = None
    style: str | None = None
    target: str | None = None
    caption: str | None = None
    input_caption: str | None = None


def _by_stem(folder: str | None) -> dict[str, str]:
    from jaxedit.data import images as imio
    return {} if not folder else {os.path.splitext(os.path.basename(f))[0]: f for f in imio.list_images(folder)}


def read_captions(path: str) -> dict[str, dict]:
    """{name: {"output", "input", "instruction"}} from a JSON or CSV file (see the module docstring)."""
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and ("name" not in rows[0] or not {"output", "caption"} & set(rows[0])):
            raise UsageError(f"{path}: expected CSV columns name, output[, input, instruction]")
        raw = {r["name"]: {"output": r.get("output") or r.get("caption"), "input": r.get("input"),
                           "instruction": r.get("instruction")} for r in rows}
    else:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: expected a JSON object {{name: caption}}")
        raw = {k: v if isinstance(v, dict) else {"output": v} for k, v in raw.items()}
    return {os.path.splitext(k)[0]: v for k, v in raw.items()}


def load_items(data: str, *, masks=None, styles=None, instruction=None, captions=None, magicbrush=False) -> list[Item]:
    if magicbrush:
        from jaxedit.data.instructions import magicbrush_records
        local = {}
        if os.path.isfile(os.path.join(data, "local_descriptions.json")):
            with open(os.path.join(data, "local_descriptions.json"), encoding="utf-8") as f:
                local = json.load(f)
        items = []
        for r in magicbrush_records(data, with_outputs=True):
            session, out_file = os.path.basename(os.path.dirname(r.output)), os.path.basename(r.output)
            items.append(Item(os.path.splitext(out_file)[0], r.input, r.instruction, r.mask, target=r.output,
                              caption=local.get(session, {}).get(out_file)))
    else:
        files, mask_files, style_map = _by_stem(data), _by_stem(masks), _by_stem(styles)
        if not files:
            raise UsageError(f"no images in {data}")
        style_list = [style_map[k] for k in sorted(style_map)]
        if styles and not style_list:
            raise UsageError(f"no style images in {styles}")
        items = []
        for i, name in enumerate(sorted(files)):
            if masks and name not in mask_files:
                raise UsageError(f"no mask for {name} in {masks}")
            style = style_map.get(name) or (style_list[i % len(style_list)] if style_list else None)
            items.append(Item(name, files[name], instruction, mask_files.get(name), style))
    for it in items:
        c = (captions or {}).get(it.name, {})
        it.caption = c.get("output") or it.caption
        it.input_caption = c.get("input") or it.input_caption
        it.instruction = c.get("instruction") or it.instruction or instruction
        if not it.instruction:
            raise UsageError(f"no instruction for {it.name}: give --instruction or one in --captions")
    return items
