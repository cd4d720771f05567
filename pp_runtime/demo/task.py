"""The demo model's task: adding two whole numbers from 0 to 99, e.g. ``"48+75="`` -> ``"123"``.

Both operands are drawn uniformly, so most questions have two two-digit numbers and many carry.
Answers are checkable by anyone (and by `check`). Questions are split once and for all into a
training part and a held-out part by a fixed hash of the operand pair, so any seed of
`train_examples` never produces a held-out question and `heldout_examples` never produces a
training one: accuracy on held-out questions measures what the model learned, not what it saw.

The prompt ends with ``=``; the answer follows directly (no space), then EOS. With the demo
tokenizer every character is its own token.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator, Optional

MAX_DIGITS = 2  # operands are 0 .. 99
HELDOUT_PERCENT = 10  # share of operand pairs reserved for evaluation
CHARS = "0123456789+="  # every character a prompt or an answer uses
DESCRIPTION = 'addition of two whole numbers from 0 to 99: "48+75=" -> "123"'

_PROMPT = re.compile(r"^(\d+)\+(\d+)=$")


@dataclass(frozen=True)
class Example:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def to_train_json(self) -> dict:
        return {"prompt": self.prompt, "completion": self.answer}


def is_heldout(a: int, b: int) -> bool:
    """Whether the pair (a, b) belongs to the held-out part (a fixed ~10% of all pairs)."""
    h = ((a * 1009 + b) * 2654435761 + 0x9E3779B9) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 2246822519) & 0xFFFFFFFF
    h ^= h >> 13
    return h % 100 < HELDOUT_PERCENT


def _operand(rng: random.Random) -> int:
    """Uniform over 0 .. 10**MAX_DIGITS - 1."""
    return rng.randint(0, 10 ** MAX_DIGITS - 1)


def _examples(rng: random.Random, heldout: bool) -> Iterator[Example]:
    while True:
        a, b = _operand(rng), _operand(rng)
        if is_heldout(a, b) == heldout:
            yield Example(a, b)


def train_examples(n: int, seed: int = 0) -> list[Example]:
    """`n` training questions (repeats possible), never a held-out one."""
    it = _examples(random.Random(f"train:{seed}"), heldout=False)
    return [next(it) for _ in range(n)]


def heldout_size() -> int:
    """How many distinct held-out questions exist."""
    top = 10 ** MAX_DIGITS
    return sum(is_heldout(a, b) for a in range(top) for b in range(top))


def heldout_examples(n: int, seed: int = 0) -> list[Example]:
    """`n` distinct held-out questions: none of them can appear in any training set."""
    if n > heldout_size():
        raise ValueError(f"only {heldout_size()} distinct held-out questions exist, asked for {n}")
    it = _examples(random.Random(f"heldout:{seed}"), heldout=True)
    out: dict[tuple[int, int], Example] = {}
    while len(out) < n:
        e = next(it)
        out.setdefault((e.a, e.b), e)
    return list(out.values())


def parse_prompt(prompt: str) -> Optional[tuple[int, int]]:
    m = _PROMPT.match(prompt)
    return (int(m.group(1)), int(m.group(2))) if m else None


def expected_answer(prompt: str) -> Optional[str]:
    """The correct completion of a task prompt, or None if the prompt is not one."""
    ab = parse_prompt(prompt)
    return None if ab is None else str(ab[0] + ab[1])


def check(prompt: str, completion: Optional[str]) -> bool:
    """True when `completion` is exactly the right answer (surrounding whitespace ignored)."""
    want = expected_answer(prompt)
    return want is not None and completion is not None and completion.strip() == want


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Lines covering every character of the task, for training the tokenizer."""
    return [e.prompt + e.answer for e in train_examples(n, seed)]
