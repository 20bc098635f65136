"""HIVE's cycle-consistency augmentation: an invertible edit (I_in, c, I_edit) also gives the
reversed triple (I_edit, c⁻¹, I_in), e.g. "add a dog" ↔ "remove the dog". Plain Python.

    rules = CycleRules.from_file("my_inverses.json")     # or CycleRules() for the table only
    rules.invert("Add a dog.")        # -> "Remove the dog."
    rules.invert("add snow and remove the car")          # -> None: not invertible

Instructions are matched case-insensitively after collapsing whitespace and dropping one
trailing period; the inverse keeps the captured words as written, a capital first letter and
the trailing period. First match wins, in this order:

1. The user mapping (``mapping=`` / `load_mapping`): exact instruction -> inverse, used in both
   directions (an entry B -> A of its own wins for B). A null inverse (JSON) or a line with no
   inverse (TSV) marks an instruction as NOT invertible.
2. Refusals (never inverted by the table; see `NOT_INVERTIBLE`): several edits in one instruction
   ("and", "then", ",", ";", "while", "but" -- "add snow and remove the car" would need every
   part inverted in reverse order), quantifiers ("all", "every", "each", "any", "both", "more",
   "less", "fewer", "some", "most" -- "remove all cars" does not say how many to add back),
   negations ("not", "no", "don't", "without"), and "change/turn/make the <attribute> ...": the
   attribute's original value (colour, style, season, weather, time, background, material, ...)
   is not in the instruction, so "change the season to winter" has no inverse.
3. The rule table `RULES` (X, A, B: any words; "a"/"an" become "the" when adding turns into
   removing):

   ==============================  ==============================  ===========================
   instruction                     inverse                         note
   ==============================  ==============================  ===========================
   add|put|place|insert X to|on|   remove the X from Y             preposition -> "from"
   in|into|onto|at Y
   remove|delete|erase|take away   add X to Y
   X from Y
   add|put|place|insert X          remove X                        a/an X -> the X
   remove|delete|erase|take away   add X
   X
   change|turn|transform A to|     same verb B to|into A           A is not an attribute (2.);
   into B                                                          a/an B -> the B
   replace A with|by B             replace B with A                a/an B -> the B
   make X bigger|larger|smaller|   make X smaller|bigger|...       antonyms: `ANTONYMS`
   brighter|darker|wider|...
   zoom in | zoom out              zoom out | zoom in
   ==============================  ==============================  ===========================

Everything else ("make it snowy", "make the car red", "add more trees") is not invertible:
the table is deliberately small, and a wrong inverse is worse than none. `augment` appends the
reversed triples of the invertible ones: input and output swapped, the same mask (the edit
region is the same), no reward (a reversed edit's reward is unknown: score the augmented file).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, Optional

#: Opposites for "make X <comparative>" (both directions).
ANTONYMS = {"bigger": "smaller", "larger": "smaller", "smaller": "bigger", "brighter": "darker",
            "darker": "brighter", "lighter": "darker", "wider": "narrower", "narrower": "wider",
            "taller": "shorter", "longer": "shorter", "shorter": "longer", "older": "younger",
            "younger": "older", "warmer": "colder", "colder": "warmer", "happier": "sadder", "sadder": "happier"}

#: Attributes whose original value an instruction does not state: "change the colour of X to red"
#: cannot be reversed.
ATTRIBUTES = ("color", "colour", "style", "season", "weather", "time", "background", "lighting", "light",
              "mood", "material", "texture", "shape", "size", "painting style", "art style", "sky")

_CONJUNCTION = r"\b(and|then|while|but|also)\b|[,;]"
_QUANTIFIER = r"\b(all|every|each|any|both|more|less|fewer|some|most|everything|everyone|none)\b"
_NEGATION = r"\b(not|no|don't|dont|never|without)\b"
_ATTRIBUTE = r"^(change|turn|transform|make)\s+(the\s+)?(" + "|".join(ATTRIBUTES) + r")\b"

#: (name, regex) refusals, checked before the rule table (see the module docstring).
NOT_INVERTIBLE = (("several edits", _CONJUNCTION), ("quantifier", _QUANTIFIER), ("negation", _NEGATION),
                  ("unstated original attribute", _ATTRIBUTE))

_ADD = r"(?:add|put|place|insert)"
_REMOVE = r"(?:remove|delete|erase|take away|get rid of)"
_PREP = r"(?:to|on|in|into|onto|at|on top of|next to)"


def _the(x: str) -> str:
    """"a dog"/"an owl" -> "the dog"/"the owl"; other noun phrases unchanged."""
    return re.sub(r"^(a|an)\s+", "the ", x, flags=re.I)


#: (regex on the normalised instruction, inverse builder) in order; the first match wins.
RULES = (
    (rf"^{_ADD}\s+(?P<x>.+?)\s+(?P<p>{_PREP})\s+(?P<y>.+)$", lambda g: f"remove {_the(g['x'])} from {g['y']}"),
    (rf"^{_REMOVE}\s+(?P<x>.+?)\s+from\s+(?P<y>.+)$", lambda g: f"add {g['x']} to {g['y']}"),
    (rf"^{_ADD}\s+(?P<x>.+)$", lambda g: f"remove {_the(g['x'])}"),
    (rf"^{_REMOVE}\s+(?P<x>.+)$", lambda g: f"add {g['x']}"),
    (r"^(?P<v>change|turn|transform)\s+(?P<a>.+?)\s+(?P<p>to|into)\s+(?P<b>.+)$",
     lambda g: f"{g['v'].lower()} {_the(g['b'])} {g['p'].lower()} {g['a']}"),
    (r"^replace\s+(?P<a>.+?)\s+(?:with|by)\s+(?P<b>.+)$", lambda g: f"replace {_the(g['b'])} with {g['a']}"),
    (r"^make\s+(?P<x>.+?)\s+(?P<c>" + "|".join(ANTONYMS) + r")$",
     lambda g: f"make {g['x']} {ANTONYMS[g['c'].lower()]}"),
    (r"^zoom\s+(?P<d>in|out)$", lambda g: "zoom " + ("out" if g["d"].lower() == "in" else "in")),
)


def normalise(instruction: str) -> str:
    """Lower case, whitespace collapsed, one trailing period dropped: the mapping's key."""
    return re.sub(r"\s+", " ", instruction.strip()).rstrip(".").strip().lower()


def load_mapping(path: str) -> dict[str, Optional[str]]:
    """A user mapping file: JSON ``{"instruction": "inverse" or null, ...}`` or TSV lines
    ``instruction<TAB>inverse`` (a line without an inverse: not invertible; blank lines and lines
    starting with # ignored). `CycleRules` matches the keys normalised (`normalise`)."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise ValueError(f"cannot read cycle mapping {path}: {e}") from e
    out: dict[str, Optional[str]] = {}
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
        if not isinstance(data, dict) or not all(isinstance(v, (str, type(None))) for v in data.values()):
            raise ValueError(f'{path}: expected {{"instruction": "inverse" or null, ...}}')
        items = data.items()
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) > 2:
                raise ValueError(f"{path}:{n}: expected 'instruction<TAB>inverse' (one tab), got {len(parts)} fields")
            items.append((parts[0], parts[1].strip() or None if len(parts) == 2 else None))
    for k, v in items:
        if not normalise(k):
            raise ValueError(f"{path}: empty instruction in the mapping")
        out[k.strip()] = v.strip() if isinstance(v, str) and v.strip() else None
    return out


class CycleRules:
    """Instruction inverter: user mapping, refusals, rule table (module docstring)."""

    def __init__(self, mapping: Optional[dict] = None):
        own = {normalise(k): v for k, v in (mapping or {}).items()}
        self.mapping = dict(own)
        for k, v in (mapping or {}).items():  # both directions, unless the inverse has an entry of its own
            if v and normalise(v) not in own:
                self.mapping[normalise(v)] = k.strip()

    @classmethod
    def from_file(cls, path: str = "") -> "CycleRules":
        return cls(load_mapping(path) if path else None)

    def why_not(self, instruction: str) -> Optional[str]:
        """The refusal that applies (None if none does; the table may still not match)."""
        key = normalise(instruction)
        if key in self.mapping:
            return None if self.mapping[key] else "user mapping"
        for name, pattern in NOT_INVERTIBLE:
            if re.search(pattern, key, flags=re.I):
                return name
        return None

    def invert(self, instruction: str) -> Optional[str]:
        """The inverse instruction, or None when it is not (known to be) invertible."""
        key = normalise(instruction)
        if key in self.mapping:
            return self.mapping[key]
        if not key or self.why_not(instruction):
            return None
        core = re.sub(r"\s+", " ", instruction.strip()).rstrip(".").strip()
        for pattern, build in RULES:
            m = re.match(pattern, core, flags=re.I)
            if m:
                out = re.sub(r"\s+", " ", build(m.groupdict())).strip()
                if core[:1].isupper():
                    out = out[:1].upper() + out[1:]
                return out + ("." if instruction.strip().endswith(".") else "")
        return None


def augment(records: Iterable, rules: CycleRules) -> tuple[list, int]:
    """records (objects with input, mask, instruction, output; `dataclasses.replace`-able) -> (the
    records followed by the reversed triple of each invertible one, number added). A record
    without an output cannot be reversed (ValueError)."""
    records = list(records)
    out = list(records)
    for r in records:
        if not r.output:
            raise ValueError(f"cycle augmentation needs the edited image of every triple ({r.input} has none)")
        inverse = rules.invert(r.instruction)
        if inverse:
            out.append(dataclasses.replace(r, input=r.output, output=r.input, instruction=inverse, reward=None))
    return out, len(out) - len(records)


def write_augmented(source: str, out: str, mapping: str = "") -> int:
    """Writes the triples JSONL ``source`` plus its reversed triples (without rewards) to ``out``
    (paths relative to ``out``'s folder), e.g. to score them with the reward model; returns the
    number added."""
    from jaxedit.data.instructions import triples_records, write_triples_jsonl
    records, added = augment(triples_records(source, with_outputs=True), CycleRules.from_file(mapping))
    write_triples_jsonl(out, records)
    return added


if __name__ == "__main__":  # python -m jaxedit.data.cycle IN.jsonl OUT.jsonl [MAPPING]
    import sys
    if len(sys.argv) not in (3, 4):
        print("usage: python -m jaxedit.data.cycle IN.jsonl OUT.jsonl [MAPPING.json|.tsv]", file=sys.stderr)
        sys.exit(2)
    n = write_augmented(*sys.argv[1:])
    print(f"{os.path.abspath(sys.argv[2])}: {n} reversed triples added")
