"""Ranked edits for the HIVE reward model: a JSONL file, one ranking per line.

    {"input": "in/0001.png", "instruction": "make the car red",
     "edits": ["out/0001_a.png", "out/0001_b.png", "out/0001_c.png"], "ranks": [2, 1, 2]}

- Paths are relative to the JSONL file's folder (absolute paths are kept as they are).
- ``edits``: at least 2 image paths. ``ranks``: one integer per edit, 1 = best; equal ranks are
  ties. Ranks must be a DENSE ranking -- every rank from 1 to max(ranks) used, no gaps: [1, 1, 2]
  is accepted, [1, 3] and the "competition" form [1, 1, 3] are rejected (a gap is more often a typo
  than meant). A ranking whose edits are all tied gives no pair and is rejected too.
- Other keys are ignored (e.g. an "id"); blank lines are skipped.
- Pairs: every ordered (better, worse) pair of edits, i.e. rank_i < rank_j; ties give no pair.

Errors (`RankingError`, a ValueError) name the file and the 1-based line number: invalid JSON,
a missing or mistyped key, fewer than 2 edits, len(ranks) != len(edits), a non-integer rank
(bools and 1.0 included), a non-dense ranking, an image file that does not exist (checked when
reading the file) or cannot be decoded (checked when its images are loaded, `load_images`).

No torch, no jax: plain Python and NumPy.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from jaxedit.data.images import ImageError, read_image


class RankingError(ValueError):
    """A rankings file or one of its lines cannot be used; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Ranking:
    """One input image, its instruction, >= 2 edited images and their ranks (1 = best)."""
    input: str                 # absolute path
    instruction: str
    edits: tuple[str, ...]     # absolute paths
    ranks: tuple[int, ...]
    source: str = ""           # the JSONL file
    line: int = 0              # 1-based line number in `source`

    def pairs(self) -> list[tuple[int, int]]:
        return ranking_pairs(self.ranks)

    def where(self) -> str:
        return f"{self.source} line {self.line}"


def ranking_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """All ordered (better, worse) index pairs: ranks[i] < ranks[j]. Ties give no pair."""
    return [(i, j) for i, ri in enumerate(ranks) for j, rj in enumerate(ranks) if ri < rj]


def pairwise_accuracy(rewards: Sequence[Sequence[float]], ranks: Sequence[Sequence[int]]) -> tuple[float, int]:
    """(accuracy, number of pairs) over all (better, worse) pairs of all rankings: a pair counts 1
    if reward[better] > reward[worse], 1/2 if they are equal, 0 otherwise. nan when there is no pair."""
    hits, n = 0.0, 0
    for rew, rk in zip(rewards, ranks):
        for i, j in ranking_pairs(rk):
            hits += 1.0 if rew[i] > rew[j] else 0.5 if rew[i] == rew[j] else 0.0
            n += 1
    return (hits / n if n else float("nan")), n


def check_ranks(ranks) -> tuple[int, ...]:
    """Validates a ranks list (see the module docstring); returns it as a tuple; raises ValueError."""
    if not isinstance(ranks, list):
        raise ValueError(f'"ranks" must be a list of integers, got {type(ranks).__name__}')
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int)]
    if bad:
        raise ValueError(f'"ranks" must be integers (1 = best), got {bad[0]!r} in {ranks}')
    if min(ranks) < 1:
        raise ValueError(f'"ranks" must be >= 1 (1 = best), got {ranks}')
    if set(ranks) != set(range(1, max(ranks) + 1)):
        raise ValueError(f'"ranks" {ranks} is not a dense ranking: every rank from 1 to {max(ranks)} must be '
                         "used, ties share a rank, no gaps (e.g. [1, 1, 2], not [1, 1, 3])")
    if max(ranks) == 1:
        raise ValueError(f'"ranks" {ranks}: all edits are tied, so the ranking gives no pair')
    return tuple(ranks)


def _parse(record, folder: str) -> tuple[str, str, tuple[str, ...], tuple[int, ...]]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("input", "instruction", "edits", "ranks") if k not in record]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(map(repr, missing))}")
    if not isinstance(record["input"], str) or not record["input"]:
        raise ValueError('"input" must be an image path (a non-empty string)')
    if not isinstance(record["instruction"], str):
        raise ValueError('"instruction" must be a string')
    edits = record["edits"]
    if not isinstance(edits, list) or not all(isinstance(e, str) and e for e in edits):
        raise ValueError('"edits" must be a list of image paths')
    if len(edits) < 2:
        raise ValueError(f'"edits" must hold at least 2 images to rank, got {len(edits)}')
    ranks = record["ranks"]
    if isinstance(ranks, list) and len(ranks) != len(edits):
        raise ValueError(f'len("ranks") = {len(ranks)} differs from len("edits") = {len(edits)}')
    ranks = check_ranks(ranks)
    paths = [os.path.join(folder, p) for p in [record["input"], *edits]]
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"image not found: {p}")
    return paths[0], record["instruction"], tuple(paths[1:]), ranks


def read_rankings(path: str) -> list[Ranking]:
    """Reads and validates a rankings JSONL file (image files must exist; they are decoded later)."""
    if not os.path.isfile(path):
        raise RankingError(f"rankings file not found: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON: {e}") from None
                inp, instruction, edits, ranks = _parse(record, folder)
            except ValueError as e:
                raise RankingError(f"{path} line {n}: {e}") from None
            out.append(Ranking(inp, instruction, edits, ranks, source=path, line=n))
    if not out:
        raise RankingError(f"{path}: no rankings")
    return out


def load_images(ranking: Ranking) -> tuple[np.ndarray, list[np.ndarray]]:
    """(input, [edits]) as uint8 (H, W, 3) RGB; an unreadable image raises RankingError naming
    the file, line and image."""
    try:
        return read_image(ranking.input), [read_image(p) for p in ranking.edits]
    except ImageError as e:
        raise RankingError(f"{ranking.where()}: {e}") from None


def write_rankings(path: str, rows: Sequence[dict]) -> None:
    """Writes rankings (dicts with input, instruction, edits, ranks; paths as given) as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
