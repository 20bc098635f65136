"""Instruction-editing datasets: examples of (input image, edit-region mask, instruction) and, when
asked (``with_outputs``: supervised / HIVE training), the edited image and a reward.

Three layouts, told apart by what ``source`` is:

- **MagicBrush** (a folder holding ``edit_sessions.json``, as the dataset's ``train/`` / ``dev/``
  folders ship): ``{img_id: [turn, ...]}``, each turn ``{"input": "<id>-input.png", "output": ...,
  "mask": "<id>-mask1.png", "instruction": "..."}`` with its files in ``images/<img_id>/``.
  Every turn is one example (turn k > 1's input is the previous turn's output, as shipped). The
  target image (``output``) is read only with ``with_outputs=True``: RL methods train without it.
- **InstructPix2Pix** (a folder holding ``seeds.json``, the layout of its generated dataset):
  ``seeds.json`` = ``[[prompt_dir, [seed, ...]], ...]``; ``<prompt_dir>/prompt.json`` holds the
  instruction as ``"edit"``; ``<prompt_dir>/<seed>_0.jpg`` is the input and ``<seed>_1.jpg`` the
  edited image. Every (prompt_dir, seed) is one example (InstructPix2Pix draws one of a
  prompt's seeds per access instead); no masks (whole frame); no split (point at a folder
  holding the split you want).
- **Triples** (a ``.jsonl`` file): one JSON object per line, ``{"input": path, "mask": path or
  null, "instruction": str, "output": path, "reward": number}``, paths relative to the file's
  folder; a null/missing mask is the whole frame; ``output`` is required only
  ``with_outputs``, ``reward`` only ``with_rewards`` (`python -m jaxedit.reward_model score
  --triples=...` writes it); other keys are ignored.

Masks: white (mean RGB >= 0.5) = edit region, as MagicBrush's mask files and `folders.load_mask`.
Every file is validated once (`folders.validate`: unreadable files skipped up to
``max_bad_files``, a mask of the wrong size is an error); malformed records are errors naming the
file and record. ``cycle`` (a `jaxedit.data.cycle.CycleRules`) appends the reversed triples of
the invertible instructions (HIVE's cycle consistency; needs the outputs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

from jaxedit.data.folders import DataError, ExampleIndex, validate


@dataclasses.dataclass(frozen=True)
class Triple:
    """One example's record: absolute paths, its instruction, and (when read) the edited image
    and the reward."""
    input: str
    mask: Optional[str]
    instruction: str
    output: Optional[str] = None
    reward: Optional[float] = None


def magicbrush_records(root: str, *, with_outputs: bool = False) -> list[Triple]:
    """Every turn under a MagicBrush split folder (its ``output`` only ``with_outputs``)."""
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
            fields = ("input", "mask", "instruction") + (("output",) if with_outputs else ())
            if not isinstance(turn, dict) or not all(isinstance(turn.get(f), str) for f in fields):
                raise DataError(f"{where}: expected an object with string fields {', '.join(fields)}")
            folder = os.path.join(root, "images", str(img_id))
            out.append(Triple(os.path.join(folder, turn["input"]), os.path.join(folder, turn["mask"]),
                              turn["instruction"], os.path.join(folder, turn["output"]) if with_outputs else None))
    return out


def ip2p_records(root: str) -> list[Triple]:
    """Every (prompt folder, seed) of an InstructPix2Pix dataset folder (``seeds.json``)."""
    seeds_file = os.path.join(root, "seeds.json")
    try:
        with open(seeds_file, encoding="utf-8") as f:
            seeds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read InstructPix2Pix seeds {seeds_file}: {e}") from e
    if not isinstance(seeds, list) or not seeds:
        raise DataError(f"{seeds_file}: expected a non-empty [[prompt_dir, [seed, ...]], ...] list")
    out = []
    for k, entry in enumerate(seeds):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and entry[1]):
            raise DataError(f"{seeds_file}: entry {k}: expected [prompt_dir, [seed, ...]]")
        folder = os.path.join(root, entry[0])
        prompt_file = os.path.join(folder, "prompt.json")
        try:
            with open(prompt_file, encoding="utf-8") as f:
                edit = json.load(f).get("edit")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise DataError(f"cannot read {prompt_file}: {e}") from e
        if not isinstance(edit, str):
            raise DataError(f'{prompt_file}: expected {{"edit": instruction, ...}}')
        for seed in entry[1]:
            out.append(Triple(os.path.join(folder, f"{seed}_0.jpg"), None, edit, os.path.join(folder, f"{seed}_1.jpg")))
    return out


def triples_records(path: str, *, with_outputs: bool = False, with_rewards: bool = False) -> list[Triple]:
    """Every line of a triples JSONL file (``output`` / ``reward`` required when asked for)."""
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
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
        output, reward = rec.get("output"), rec.get("reward")
        if with_outputs and not isinstance(output, str):
            raise DataError(f'{path}:{n}: expected an "output" path (the edited image)')
        if with_rewards and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                             or not math.isfinite(reward)):
            raise DataError(f'{path}:{n}: expected a finite number "reward" (python -m jaxedit.reward_model score '
                            f'--triples=... writes it)')
        out.append(Triple(rel(rec["input"]), rel(mask) if mask else None, rec["instruction"],
                          rel(output) if with_outputs else None, float(reward) if with_rewards else None))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def write_triples_jsonl(path: str, records: Sequence[Triple]) -> None:
    """Writes records as a triples JSONL file, paths relative to its folder (atomic rename);
    ``output`` / ``reward`` only where set."""
    folder = os.path.dirname(os.path.abspath(path))
    rel = lambda p: os.path.relpath(p, folder) if p else None
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".partial-" + os.path.basename(path))
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            rec = {"input": rel(r.input), "mask": rel(r.mask), "instruction": r.instruction}
            if r.output:
                rec["output"] = rel(r.output)
            if r.reward is not None:
                rec["reward"] = float(r.reward)
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def read_records(source: str, *, with_outputs: bool = False, with_rewards: bool = False) -> list[Triple]:
    """The records of a MagicBrush folder, an InstructPix2Pix folder or a triples JSONL file."""
    if with_rewards and not source.endswith(".jsonl"):
        raise DataError(f"{source}: rewards come in a triples .jsonl file (a \"reward\" per line: python -m "
                        "jaxedit.reward_model score --triples=...)")
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "seeds.json")):
            return ip2p_records(source)
        return magicbrush_records(source, with_outputs=with_outputs)
    if source.endswith(".jsonl"):
        return triples_records(source, with_outputs=with_outputs, with_rewards=with_rewards)
    raise DataError(f"instruction data {source}: expected a MagicBrush folder (with edit_sessions.json), an "
                    "InstructPix2Pix folder (with seeds.json) or a .jsonl file of {input, mask, instruction} records")


def build_instruction_index(source: str, styles: list[str] | tuple[str, ...] = (), *, max_bad_files: int = 10,
                            threads: int = 4, with_outputs: bool = False, with_rewards: bool = False,
                            cycle=None) -> ExampleIndex:
    """Validated index of a MagicBrush / InstructPix2Pix folder or a triples JSONL file (see the
    module docstring). ``with_outputs``: also the edited images (``index.outputs``; the loader
    then returns "edited"); ``with_rewards``: also the rewards (``index.rewards``); ``cycle``: a
    `jaxedit.data.cycle.CycleRules` adding the reversed triples (needs ``with_outputs``, no rewards)."""
    records = read_records(source, with_outputs=with_outputs or cycle is not None, with_rewards=with_rewards)
    if cycle is not None:
        if with_rewards:
            raise DataError("cycle augmentation with rewards: reversed triples have no reward; augment the file "
                            "first (python -m jaxedit.data.cycle IN OUT) and score it with the reward model")
        from jaxedit.data.cycle import augment
        records, _ = augment(records, cycle)
    return validate([r.input for r in records], [r.mask for r in records], list(styles),
                    instructions=[r.instruction for r in records], max_bad_files=max_bad_files, threads=threads,
                    what=source, outputs=[r.output for r in records] if with_outputs or cycle is not None else None,
                    rewards=[r.reward for r in records] if with_rewards else None)
