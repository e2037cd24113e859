"""Scene layout and wording shared by the synthetic and emoji generators.

A scene is a group of ``count`` copies of object A placed in one half of the picture and one
object B in the other half; the relation (``left of``, ``right of``, ``above``, ``below``) says
where A is relative to B.
"""

from __future__ import annotations

import random

RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Where group A / object B sit, in words, for each relation.
SIDES = {
    "left of": ("on the left", "on the right"),
    "right of": ("on the right", "on the left"),
    "above": ("in the upper half", "in the lower half"),
    "below": ("in the lower half", "in the upper half"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
Box = tuple[int, int, int, int]  # x0, y0, x1, y1


def halves(relation: str, region: Box) -> tuple[Box, Box]:
    """Split ``region`` into (A's half, B's half) for ``relation``."""
    x0, y0, x1, y1 = region
    if relation in ("left of", "right of"):
        mid = (x0 + x1) // 2
        first, second = (x0, y0, mid, y1), (mid, y0, x1, y1)
        return (first, second) if relation == "left of" else (second, first)
    mid = (y0 + y1) // 2
    first, second = (x0, y0, x1, mid), (x0, mid, x1, y1)
    return (first, second) if relation == "above" else (second, first)


def cells(box: Box, n: int) -> list[Box]:
    """Cut ``box`` into ``n`` equal cells along its longer side."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w >= h:
        return [(x0 + w * i // n, y0, x0 + w * (i + 1) // n, y1) for i in range(n)]
    return [(x0, y0 + h * i // n, x1, y0 + h * (i + 1) // n) for i in range(n)]


def place(cell: Box, size: int, rng: random.Random) -> tuple[int, int]:
    """Top-left corner of a ``size``-pixel object placed at a random spot inside ``cell``."""
    x0, y0, x1, y1 = cell
    slack_x, slack_y = max(0, x1 - x0 - size), max(0, y1 - y0 - size)
    return x0 + rng.randint(0, slack_x), y0 + rng.randint(0, slack_y)


def article(word: str) -> str:
    """``a`` or ``an`` for ``word`` (by its first letter)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


_IRREGULAR = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
    "foot": "feet", "tooth": "teeth", "goose": "geese", "fish": "fish", "sheep": "sheep",
    "deer": "deer", "leaf": "leaves", "knife": "knives", "die": "dice", "ox": "oxen",
}
_PERSONS = frozenset({"man", "woman", "person", "child", "people", "men", "women"})
# Words after which the head noun of a name has ended ("face WITH tears of joy").
_BREAKS = frozenset(
    {"with", "of", "in", "on", "for", "from", "without", "at", "by", "and", "holding", "facing"}
)


def _plural_word(word: str) -> str:
    lower = word.lower()
    if lower in _IRREGULAR:
        return _IRREGULAR[lower]
    if lower.endswith(("ss", "sh", "ch", "x", "z")):
        return word + "es"
    if lower.endswith("s"):
        return word
    if lower.endswith("y") and len(word) > 1 and lower[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def plural(name: str) -> str:
    """Best-effort English plural of a noun phrase: ``face with tears`` -> ``faces with tears``."""
    words = name.split(" ")
    last = len(words) - 1
    head = last
    for i, word in enumerate(words[1:], start=1):
        participle = len(word) > 4 and word.endswith(("ing", "ed"))
        if word.lower() in _BREAKS or (participle and (i < last or words[i - 1] in _PERSONS)):
            head = i - 1
            break
    words[head] = _plural_word(words[head])
    return " ".join(words)


def counted(count: int, name: str) -> str:
    """``a red apple`` / ``three red apples``."""
    if count == 1:
        return f"{article(name)} {name}"
    return f"{COUNT_WORDS.get(count, str(count))} {plural(name)}"
