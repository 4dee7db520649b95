"""What the domain generators share: the template type, the worked example ending in its `Answer:` line, a random
nonzero integer, and the text of signed terms, chains of equalities and exact decimals."""

from __future__ import annotations

import random
from collections.abc import Callable
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from fractions import Fraction

from merging.data.example import Example

Template = Callable[[random.Random], Example]


def worked_example(prompt: str, steps: list[str], answer: object) -> Example:
    """The prompt, and the steps followed by `Answer: answer`, with the answer as text."""
    answer_text = str(answer)
    return Example(prompt=prompt, response="\n".join([*steps, f"Answer: {answer_text}"]), answer=answer_text)


def signed_term(value: int | Fraction | Decimal) -> str:
    """` + 7` or ` - 4`, to follow another term; empty for zero, so that a zero term disappears."""
    if value == 0:
        return ""
    return f" + {value}" if value > 0 else f" - {-value}"


def paren_negative(value: int) -> str:
    """A negative number in parentheses, so that `12 / (-3)` cannot be read as a subtraction."""
    return f"({value})" if value < 0 else str(value)


def random_nonzero(rng: random.Random, limit: int) -> int:
    return rng.choice((-1, 1)) * rng.randint(1, limit)


def chain(*parts: object) -> str:
    """`a = b = c`, leaving out any part equal to the one before it (no `5 = 5`)."""
    shown = [str(parts[0])]
    for part in map(str, parts[1:]):
        if part != shown[-1]:
            shown.append(part)
    return " = ".join(shown)


def decimal_text(value: Decimal) -> str:
    """Exact decimal without trailing zeros: 98.0 -> 98, 91.250 -> 91.25."""
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def round_one_place(value: Decimal) -> Decimal:
    # Half up, the rule taught in school, rather than Decimal's default of half even.
    return value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def approx_text(value: Decimal) -> str:
    """`value` cut to three decimals, marked `...` where that dropped digits."""
    cut = value.quantize(Decimal("0.001"), rounding=ROUND_DOWN)
    return decimal_text(cut) + ("..." if cut != value else "")
