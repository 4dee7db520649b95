"""Discrete mathematics: counting with permutations, combinations, factorials, repetition and the product rule."""

from __future__ import annotations

import math
import random

from merging.data.domains._working import Template, worked_example
from merging.data.example import Example

_THINGS = ("books", "flags", "cards", "songs", "paintings", "toys", "coins", "chairs", "plants", "stamps", "lamps",
           "photos", "shells", "vases", "candles", "marbles")
_PEOPLE = ("students", "players", "friends", "runners", "singers", "workers", "guests", "pupils", "doctors",
           "artists", "cooks", "pilots")
_SHAREABLE_CHOICES = ("colours", "flavours", "songs", "games", "films", "routes")  # several people may pick the same
_CHOICE_KINDS = (("starters", "mains", "desserts", "drinks"), ("shirts", "pairs of trousers", "hats", "scarves"),
                 ("breads", "fillings", "sauces", "salads"), ("colours", "sizes", "fabrics", "patterns"))


def _falling(n: int, count: int) -> list[int]:
    """n, n - 1, ..., down `count` factors: what is left of n! after cancelling (n - count)!."""
    return list(range(n, n - count, -1))


def _product_text(factors: list[int]) -> str:
    return " * ".join(map(str, factors))


def _discrete_permutation(rng: random.Random) -> Example:
    n = rng.randint(4, 16)
    r = rng.randint(2, min(4, n - 1))
    prompt = rng.choice((f"In how many ways can {r} of {n} different {rng.choice(_THINGS)} be arranged in a row?",
                         f"How many {r}-letter codes can be made from {n} different letters if no letter repeats?",
                         f"{n} {rng.choice(_PEOPLE)} enter a contest. In how many ways can the top {r} places be "
                         "filled?",
                         f"In how many ways can {r} of {n} {rng.choice(_PEOPLE)} sit in a row of {r} chairs?",
                         f"Compute P({n}, {r})."))
    factors = _falling(n, r)
    steps = ["Order matters, so count permutations: P(n, r) = n! / (n - r)!",
             f"P({n}, {r}) = {n}! / {n - r}! = {_product_text(factors)} = {math.prod(factors)}"]
    return worked_example(prompt, steps, math.prod(factors))


def _discrete_combination(rng: random.Random) -> Example:
    n = rng.randint(4, 18)
    r = rng.randint(2, min(5, n - 2))
    prompt = rng.choice((f"How many ways are there to choose {r} {rng.choice(_THINGS)} from {n}?",
                         f"A committee of {r} is chosen from {n} {rng.choice(_PEOPLE)}. How many committees are "
                         "possible?",
                         f"A team of {r} is picked from {n} {rng.choice(_PEOPLE)}. How many different teams are there?",
                         f"In how many ways can {r} {rng.choice(_THINGS)} be picked from a box of {n}?",
                         f"Compute C({n}, {r})."))
    numerator, denominator = math.prod(_falling(n, r)), math.factorial(r)
    steps = ["Order does not matter, so count combinations: C(n, r) = n! / (r! (n - r)!)",
             f"C({n}, {r}) = ({_product_text(_falling(n, r))}) / ({_product_text(_falling(r, r))}) "
             f"= {numerator} / {denominator} = {numerator // denominator}"]
    return worked_example(prompt, steps, numerator // denominator)


def _discrete_arrangement(rng: random.Random) -> Example:
    n = rng.randint(3, 10)
    prompt = rng.choice((f"In how many different orders can {n} {rng.choice(_THINGS)} be lined up?",
                         f"How many ways can {n} {rng.choice(_PEOPLE)} stand in a line?",
                         f"In how many ways can {n} {rng.choice(_THINGS)} be placed on a shelf?"))
    steps = [f"Every order counts, so the answer is {n}!",
             f"{n}! = {_product_text(_falling(n, n))} = {math.factorial(n)}"]
    return worked_example(prompt, steps, math.factorial(n))


def _discrete_with_repetition(rng: random.Random) -> Example:
    n, r = rng.randint(2, 12), rng.randint(2, 5)
    prompt = rng.choice((f"How many {r}-letter strings can be made from {n} letters if letters may repeat?",
                         f"A lock has {r} dials with {n} symbols on each. How many settings are there?",
                         f"{r} {rng.choice(_PEOPLE)} each choose one of {n} {rng.choice(_SHAREABLE_CHOICES)}. "
                         "In how many ways can they choose?"))
    steps = [f"Each of the {r} positions has {n} choices, so the count is {n}^{r}",
             f"{_product_text([n] * r)} = {n**r}"]
    return worked_example(prompt, steps, n**r)


def _discrete_product_rule(rng: random.Random) -> Example:
    kinds = rng.choice(_CHOICE_KINDS)[:rng.randint(2, 4)]
    counts = [rng.randint(2, 12) for _ in kinds]
    offers = [f"{count} {kind}" for count, kind in zip(counts, kinds, strict=True)]
    prompt = f"There are {', '.join(offers[:-1])} and {offers[-1]}. In how many ways can one of each be chosen?"
    steps = ["Each choice is independent, so multiply the counts:", f"{_product_text(counts)} = {math.prod(counts)}"]
    return worked_example(prompt, steps, math.prod(counts))


TEMPLATES: tuple[Template, ...] = (_discrete_permutation, _discrete_combination, _discrete_arrangement,
                                  _discrete_with_repetition, _discrete_product_rule)
