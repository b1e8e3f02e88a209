"""model.layers: the stack as a pattern of mixer names, one block per entry.

    attention                     n_layers blocks of one mixer (a bare name; `transformer` is attention's preset)
    mamba*3,attention             a list: 4 blocks
    (mamba*3,attention)*2         groups repeat: 8 blocks
    [mamba, mamba, attention]     a YAML list of names works too

A pattern with a count or a comma fixes the depth: model.n_layers must then agree with it or be left out.
"""
from __future__ import annotations

import re
from itertools import groupby

from archlab.archs.layers.mixer import MIXERS, closest

# preset name -> the mixer it repeats model.n_layers times (a bare mixer name does the same)
PRESETS = {"transformer": "attention"}
# the name a stack goes by in reports: a preset's, or "hybrid" for Mamba with attention (Jamba's layout)
HYBRID_MIXERS = {"mamba", "attention"}

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_]\w*)|(?P<count>\*\s*\d+)|(?P<punct>[(),*])|(?P<bad>\S))")


def is_bare_name(pattern: str | list[str]) -> bool:
    """Whether the pattern is one name that repeats n_layers times (its depth comes from n_layers)."""
    return isinstance(pattern, str) and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", pattern) is not None


def expand_layers(pattern: str | list[str], n_layers: int) -> list[str]:
    """The mixer name of every block. Raises ValueError (one line) for a malformed pattern or unknown name."""
    if isinstance(pattern, list):
        if not pattern or not all(isinstance(name, str) for name in pattern):
            raise ValueError("model.layers as a list must hold mixer names, e.g. [mamba, mamba, attention]")
        names = [name.strip() for name in pattern]
    elif not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("model.layers is empty; give a mixer name or a pattern such as 'mamba*3,attention'")
    elif is_bare_name(pattern):
        names = [PRESETS.get(pattern.strip(), pattern.strip())] * n_layers
    else:
        names = _Parser(pattern).parse()
    for name in names:
        if name not in MIXERS:
            raise ValueError(f"model.layers: unknown mixer {name!r}{closest(name, [*MIXERS, *PRESETS])}")
    return names


def compact(names: list[str]) -> str:
    """The shortest plain form of a list of mixer names: runs become name*count ('mamba*3,attention')."""
    runs = [(name, len(list(group))) for name, group in groupby(names)]
    return ",".join(name if count == 1 else f"{name}*{count}" for name, count in runs)


def stack_name(names: list[str]) -> str:
    """What reports call a stack: transformer, mamba, hybrid (Mamba + attention), else its compact pattern."""
    kinds = set(names)
    if len(kinds) == 1:
        (kind,) = kinds
        return next((preset for preset, mixer in PRESETS.items() if mixer == kind), kind)
    return "hybrid" if kinds == HYBRID_MIXERS else compact(names)


class _Parser:
    """Recursive descent over  sequence := item (',' item)* ;  item := (name | '(' sequence ')') ('*' count)?"""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.tokens = []
        for match in _TOKEN.finditer(pattern.rstrip()):
            kind = match.lastgroup
            if kind == "bad":
                self._fail(f"unexpected {match.group('bad')!r}")
            self.tokens.append((kind, match.group(kind).replace(" ", "")))
        self.position = 0

    def parse(self) -> list[str]:
        names = self._sequence()
        if self.position < len(self.tokens):
            self._fail(f"unexpected {self.tokens[self.position][1]!r}")
        return names

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _sequence(self) -> list[str]:
        names = self._item()
        while self._peek() == ("punct", ","):
            self.position += 1
            names += self._item()
        return names

    def _item(self) -> list[str]:
        token = self._peek()
        if token is None:
            self._fail("it ends where a mixer name or '(' should be")
        self.position += 1
        if token[0] == "name":
            names = [token[1]]
        elif token == ("punct", "("):
            names = self._sequence()
            if self._peek() != ("punct", ")"):
                self._fail("a '(' is not closed")
            self.position += 1
        else:
            self._fail(f"{token[1]!r} where a mixer name or '(' should be")
        if self._peek() and self._peek()[0] == "count":
            count = int(self._peek()[1][1:])
            self.position += 1
            if count < 1:
                self._fail("a repeat count must be at least 1")
            names = names * count
        return names

    def _fail(self, why: str):
        raise ValueError(f"model.layers {self.pattern!r} is not a layer pattern ({why}); write e.g. "
                         "'mamba*3,attention' or '(mamba*3,attention)*2'")
