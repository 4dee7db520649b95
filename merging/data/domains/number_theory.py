"""Number theory: Euclid's algorithm, prime factorisation and modular arithmetic."""

from __future__ import annotations

import math
import random

from merging.data.domains._working import Template, chain, worked_example
from merging.data.example import Example

_SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23)
_MAX_FACTORISED = 2000
_MAX_EUCLID_STEPS = 6  # keeps a worked solution within the tiny models' context


def _euclid(a: int, b: int) -> tuple[int, list[str]]:
    """gcd(a, b) for a > b > 0, and one `a = q * b + r` line per division."""
    steps = []
    while b:
        steps.append(f"{a} = {a // b} * {b} + {a % b}")
        a, b = b, a % b
    return a, steps


def _number_pair(rng: random.Random, factor_limit: int, multiple_limit: int) -> tuple[int, int]:
    """Two different numbers, the larger first, that share a random factor and need few Euclid steps."""
    while True:
        factor = rng.randint(1, factor_limit)
        a, b = factor * rng.randint(2, multiple_limit), factor * rng.randint(2, multiple_limit)
        if a != b and len(_euclid(max(a, b), min(a, b))[1]) <= _MAX_EUCLID_STEPS:
            return max(a, b), min(a, b)


def _number_theory_gcd(rng: random.Random) -> Example:
    a, b = _number_pair(rng, 20, 25)
    gcd, steps = _euclid(a, b)
    prompt = rng.choice((f"Use the Euclidean algorithm to find gcd({a}, {b}).",
                         f"What is the greatest common divisor of {a} and {b}?", f"Find gcd({a}, {b})."))
    return worked_example(prompt, [*steps, f"The last nonzero remainder is {gcd}"], gcd)


def _number_theory_lcm(rng: random.Random) -> Example:
    a, b = _number_pair(rng, 12, 12)
    gcd, steps = _euclid(a, b)
    prompt = rng.choice((f"Find lcm({a}, {b}).", f"What is the least common multiple of {a} and {b}?"))
    steps = [*steps, f"gcd = {gcd}, so lcm = {a} * {b} / {gcd} = {a * b} / {gcd} = {a * b // gcd}"]
    return worked_example(prompt, steps, a * b // gcd)


def _number_theory_factorisation(rng: random.Random) -> Example:
    while True:
        primes = sorted(rng.choice(_SMALL_PRIMES) for _ in range(rng.randint(2, 5)))
        if math.prod(primes) <= _MAX_FACTORISED:
            break
    n = math.prod(primes)
    prompt = rng.choice((f"Write {n} as a product of primes.", f"Find the prime factorisation of {n}.",
                         f"Factorise {n} into primes."))
    steps, rest = ["Divide by the smallest prime factor, again and again:"], n
    for prime in primes[:-1]:
        steps.append(f"{rest} = {prime} * {rest // prime}")
        rest //= prime
    steps.append(f"{rest} is prime")
    powers = [prime if primes.count(prime) == 1 else f"{prime}^{primes.count(prime)}" for prime in sorted(set(primes))]
    return worked_example(prompt, steps, " * ".join(map(str, powers)))


def _number_theory_remainder(rng: random.Random) -> Example:
    n, modulus = rng.randint(10, 999), rng.randint(3, 12)
    prompt = rng.choice((f"What is {n} mod {modulus}?", f"Find the remainder when {n} is divided by {modulus}."))
    steps = [f"Divide {n} by {modulus}: {n} = {n // modulus} * {modulus} + {n % modulus}",
             f"The remainder is {n % modulus}"]
    return worked_example(prompt, steps, n % modulus)


def _number_theory_modular_arithmetic(rng: random.Random) -> Example:
    x, y, modulus = rng.randint(10, 99), rng.randint(10, 99), rng.randint(3, 12)
    operator = rng.choice(("+", "*"))
    x_mod, y_mod = x % modulus, y % modulus
    combined = x_mod + y_mod if operator == "+" else x_mod * y_mod
    prompt = f"Compute ({x} {operator} {y}) mod {modulus}."
    steps = [f"Reduce first: {x} mod {modulus} = {x_mod} and {y} mod {modulus} = {y_mod}",
             f"{x_mod} {operator} {y_mod} = {combined}", f"{combined} mod {modulus} = {combined % modulus}"]
    return worked_example(prompt, steps, combined % modulus)


def _number_theory_power(rng: random.Random) -> Example:
    base, exponent, modulus = rng.randint(2, 15), rng.randint(2, 6), rng.randint(3, 13)
    prompt = rng.choice((f"Compute {base}^{exponent} mod {modulus}.",
                         f"What is the remainder of {base}^{exponent} divided by {modulus}?"))
    residue = base % modulus
    steps = [f"Multiply by {base} each step, reducing mod {modulus}:",
             f"{chain(f'{base}^1', base, residue)} (mod {modulus})"]
    for power in range(2, exponent + 1):
        product = residue * base
        residue = product % modulus
        steps.append(f"{chain(f'{base}^{power}', f'{product // base} * {base}', product, residue)} (mod {modulus})")
    return worked_example(prompt, steps, residue)


TEMPLATES: tuple[Template, ...] = (_number_theory_gcd, _number_theory_lcm, _number_theory_factorisation,
                                  _number_theory_remainder, _number_theory_modular_arithmetic, _number_theory_power)
