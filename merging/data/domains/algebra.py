"""Algebra: linear equations with integer roots, solved by inverse operations."""

from __future__ import annotations

import random

from merging.data.domains._working import Template, paren_negative, random_nonzero, signed_term, worked_example
from merging.data.example import Example

_UNKNOWNS = "xyntm"
_SOLVE_PHRASINGS = ("Solve for {v}: {eq}", "Find {v} if {eq}.", "What value of {v} satisfies {eq}?",
                    "Solve {eq} for {v}.")


def _coefficient_term(coefficient: int, variable: str) -> str:
    """`3x`, `x`, `-x` or `-3x`."""
    if abs(coefficient) == 1:
        return variable if coefficient == 1 else f"-{variable}"
    return f"{coefficient}{variable}"


def _linear(coefficient: int, variable: str, constant: int) -> str:
    return _coefficient_term(coefficient, variable) + signed_term(constant)


def _move_constant(constant: int) -> str:
    """How to remove `+ constant` from a side: `Subtract 7 from` or `Add 4 to`."""
    return f"Subtract {constant} from" if constant > 0 else f"Add {-constant} to"


def _solve_prompt(rng: random.Random, variable: str, equation: str) -> str:
    return rng.choice(_SOLVE_PHRASINGS).format(v=variable, eq=equation)


def _algebra_two_step(rng: random.Random) -> Example:
    variable, root = rng.choice(_UNKNOWNS), rng.randint(-12, 20)
    a, b = random_nonzero(rng, 12), random_nonzero(rng, 30)
    if abs(a) == 1:  # dividing by 1 would leave the second step with nothing to teach
        a *= 2
    c = a * root + b
    steps = [f"{_move_constant(b)} both sides: {_coefficient_term(a, variable)} = {c - b}",
             f"Divide both sides by {a}: {variable} = {c - b} / {paren_negative(a)} = {root}"]
    return worked_example(_solve_prompt(rng, variable, f"{_linear(a, variable, b)} = {c}"), steps, root)


def _algebra_both_sides(rng: random.Random) -> Example:
    variable, root = rng.choice(_UNKNOWNS), rng.randint(-10, 15)
    c = rng.randint(1, 9)
    a = c + rng.randint(2, 8)
    b = rng.randint(-20, 20)
    d = (a - c) * root + b
    steps = [f"Subtract {_coefficient_term(c, variable)} from both sides: {_linear(a - c, variable, b)} = {d}"]
    if b != 0:
        steps.append(f"{_move_constant(b)} both sides: {_coefficient_term(a - c, variable)} = {d - b}")
    steps.append(f"Divide both sides by {a - c}: {variable} = {d - b} / {a - c} = {root}")
    equation = f"{_linear(a, variable, b)} = {_linear(c, variable, d)}"
    return worked_example(_solve_prompt(rng, variable, equation), steps, root)


def _algebra_brackets(rng: random.Random) -> Example:
    variable, root = rng.choice(_UNKNOWNS), rng.randint(-10, 15)
    a, b = rng.randint(2, 9), random_nonzero(rng, 12)
    inner = root + b
    steps = [f"Divide both sides by {a}: {variable}{signed_term(b)} = {a * inner} / {a} = {inner}",
             f"{_move_constant(b)} both sides: {variable} = {inner}{signed_term(-b)} = {root}"]
    return worked_example(_solve_prompt(rng, variable, f"{a}({variable}{signed_term(b)}) = {a * inner}"), steps, root)


def _algebra_fraction(rng: random.Random) -> Example:
    variable, quotient = rng.choice(_UNKNOWNS), rng.randint(-8, 12)
    a, b = rng.randint(2, 9), random_nonzero(rng, 15)
    steps = [f"{_move_constant(b)} both sides: {variable}/{a} = {quotient + b}{signed_term(-b)} = {quotient}",
             f"Multiply both sides by {a}: {variable} = {paren_negative(quotient)} * {a} = {quotient * a}"]
    return worked_example(_solve_prompt(rng, variable, f"{variable}/{a}{signed_term(b)} = {quotient + b}"), steps,
                          quotient * a)


TEMPLATES: tuple[Template, ...] = (_algebra_two_step, _algebra_both_sides, _algebra_brackets, _algebra_fraction)
