"""Nine procedurally generated problem domains, mirroring the nine domains of the merging scaling-law study.

Every example is a short prompt and a worked solution whose last line is `Answer: X`, with `Example.answer == X`.
Answers are right by construction: a template picks the solution first (the integer root, the Pythagorean triple,
the mRNA) and builds the problem around it, with exact integer, Fraction or Decimal arithmetic. Each domain mixes
several templates and phrasings, so that a tiny model learns the reasoning pattern rather than a few strings.
"""

from __future__ import annotations

import random

from merging.data.domains import algebra, analysis, biology, chemistry, code, discrete, geometry, number_theory, physics
from merging.data.domains._working import Template
from merging.data.example import Example
from merging.errors import ConfigError
from merging.seeding import python_rng

DOMAINS: tuple[str, ...] = (
    "algebra", "analysis", "geometry", "discrete", "number_theory", "code", "chemistry", "physics", "biology",
)

_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "algebra": algebra.TEMPLATES, "analysis": analysis.TEMPLATES, "geometry": geometry.TEMPLATES,
    "discrete": discrete.TEMPLATES, "number_theory": number_theory.TEMPLATES, "code": code.TEMPLATES,
    "chemistry": chemistry.TEMPLATES, "physics": physics.TEMPLATES, "biology": biology.TEMPLATES,
}

# A request stops with an error after this many draws in a row that repeat a prompt already taken: by then the
# domain is all but exhausted, and the check costs milliseconds instead of a long search.
_MAX_REPEATS_IN_A_ROW = 1000


def generate(domain: str, count: int, seed: int) -> list[Example]:
    """`count` examples of `domain`, identical for the same arguments on any machine and in any process.

    Prompts may repeat (some templates have only a few hundred distinct problems); make_splits rules that out.
    """
    templates = _templates(domain)
    rng = python_rng(seed, domain)
    return [rng.choice(templates)(rng) for _ in range(count)]


def make_splits(domain: str, sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    """Splits of the requested sizes with no prompt repeated within or across them, in the order of `sizes`.

    Each split draws from its own stream, and smaller splits draw first, so the evaluation and calibration sets stay
    the same when only the size of the training set changes.
    """
    templates = _templates(domain)
    for name, size in sizes.items():
        if size < 0:
            raise ConfigError(f"split '{name}' of domain '{domain}' has size {size}; sizes must be >= 0")
    taken: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for name in sorted(sizes, key=lambda split: (sizes[split], split)):
        splits[name] = _distinct_examples(templates, sizes[name], python_rng(seed, domain, name), taken)
        if len(splits[name]) < sizes[name]:
            requested = ", ".join(f"{size} {split}" for split, size in sizes.items())
            raise ConfigError(f"domain '{domain}' ran out of distinct prompts after {len(taken)} of the "
                              f"{sum(sizes.values())} requested ({requested}); ask for fewer examples")
    return {name: splits[name] for name in sizes}


def _templates(domain: str) -> tuple[Template, ...]:
    if domain not in _TEMPLATES:
        raise ConfigError(f"unknown domain '{domain}'; choose one of {', '.join(DOMAINS)}")
    return _TEMPLATES[domain]


def _distinct_examples(templates: tuple[Template, ...], size: int, rng: random.Random,
                       taken: set[str]) -> list[Example]:
    """Up to `size` examples whose prompts are not in `taken` (which grows); fewer when the domain runs dry."""
    examples: list[Example] = []
    repeats = 0
    while len(examples) < size and repeats < _MAX_REPEATS_IN_A_ROW:
        example = rng.choice(templates)(rng)
        if example.prompt in taken:
            repeats += 1
            continue
        repeats = 0
        taken.add(example.prompt)
        examples.append(example)
    return examples

