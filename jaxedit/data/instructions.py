"""Instruction-editing datasets: examples of (input image, edit-region mask, instruction).

Two layouts, told apart by what ``source`` is:

- **MagicBrush** (a folder holding ``edit_sessions.json``, as the dataset's ``train/`` / ``dev/``
  folders ship): ``{img_id: [turn, ...]}``, each turn ``{"input": "<id>-input.png", "output": ...,
  "mask": "<id>-mask1.png", "instruction": "..."}`` with its files in ``images/<img_id>/``.
  Every turn is one example (turn k > 1's input is the previous turn's output, as shipped). The
  target image (``output``) is never read: RL methods train without it.
- **Triples** (a ``.jsonl`` file): one JSON object per line, ``{"input": path, "mask": path or
  null, "instruction": str}``, paths relative to the file's folder; a null/missing mask is the
  whole frame.

Masks: white (mean RGB >= 0.5) = edit region, as MagicBrush's mask files and `folders.load_mask`.
Every file is validated once (`folders.validate`: unreadable files skipped up to
``max_bad_files``, a mask of the wrong size is an error); malformed records are errors naming the
file and record.
"""
from __future__ import annotations

import json
import os

from jaxedit.data.folders import DataError, ExampleIndex, validate


def magicbrush_records(root: str) -> list[tuple[str, str | None, str]]:
    """(input path, mask path, instruction) of every turn under a MagicBrush split folder."""
    sessions_file = os.path.join(root, "edit_sessions.json")
    try:
        with open(sessions_file, encoding="utf-8") as f:
            sessions = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read MagicBrush sessions {sessions_file}: {e}") from e
    if not isinstance(sessions, dict) or not sessions:
        raise DataError(f"{sessions_file}: expected a non-empty {{img_id: [turns]}} object")
    out = []
    for img_id, turns in sorted(sessions.items()):
        for k, turn in enumerate(turns if isinstance(turns, list) else [None]):
            where = f"{sessions_file}: session {img_id!r} turn {k}"
            if not isinstance(turn, dict) or not all(isinstance(turn.get(f), str) for f in ("input", "mask", "instruction")):
                raise DataError(f"{where}: expected an object with string fields input, mask, instruction")
            folder = os.path.join(root, "images", str(img_id))
            out.append((os.path.join(folder, turn["input"]), os.path.join(folder, turn["mask"]), turn["instruction"]))
    return out


def triples_records(path: str) -> list[tuple[str, str | None, str]]:
    """(input path, mask path or None, instruction) of every line of a triples JSONL file."""
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: p if os.path.isabs(p) else os.path.join(base, p)
    out = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read triples file {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e})") from e
        mask = rec.get("mask") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) \
                or not isinstance(rec.get("instruction"), str) or not isinstance(mask, (str, type(None))):
            raise DataError(f'{path}:{n}: expected {{"input": path, "mask": path or null, "instruction": text}}')
        out.append((rel(rec["input"]), rel(mask) if mask else None, rec["instruction"]))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def build_instruction_index(source: str, styles: list[str] | tuple[str, ...] = (), *, max_bad_files: int = 10,
                            threads: int = 4) -> ExampleIndex:
    """Validated index of a MagicBrush folder or a triples JSONL file (see the module docstring)."""
    if os.path.isdir(source):
        records = magicbrush_records(source)
    elif source.endswith(".jsonl"):
        records = triples_records(source)
    else:
        raise DataError(f"instruction data {source}: expected a MagicBrush folder (with edit_sessions.json) "
                        "or a .jsonl file of {input, mask, instruction} records")
    inputs, masks, instructions = (list(x) for x in zip(*records))
    return validate(inputs, masks, list(styles), instructions=instructions, max_bad_files=max_bad_files,
                    threads=threads, what=source)
