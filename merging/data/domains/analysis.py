"""Analysis: derivatives by the power rule, limits by substitution, by cancelling a factor, or at infinity."""

from __future__ import annotations

import random
from fractions import Fraction

from merging.data.domains._working import Template, chain, paren_negative, random_nonzero, signed_term, worked_example
from merging.data.example import Example

Polynomial = list[tuple[int, int]]  # (coefficient, power), highest power first


def _polynomial(terms: Polynomial, variable: str = "x") -> str:
    """`3x^3 - x + 5`; `variable` may be a value such as `(-2)` to show a substitution."""
    text = ""
    for coefficient, power in terms:
        if coefficient == 0:
            continue
        body = _monomial(abs(coefficient), power, variable)
        if text:
            text += f" - {body}" if coefficient < 0 else f" + {body}"
        else:
            text = f"-{body}" if coefficient < 0 else body
    return text or "0"


def _monomial(magnitude: int, power: int, variable: str) -> str:
    if power == 0:
        return str(magnitude)
    base = variable if power == 1 else f"{variable}^{power}"
    return base if magnitude == 1 else f"{magnitude}{base}"


def _random_polynomial(rng: random.Random, degree: int) -> Polynomial:
    """A nonzero leading term and lower terms of which about a third are zero."""
    lower = [(0 if rng.randint(0, 2) == 0 else rng.randint(-9, 9), power) for power in range(degree - 1, -1, -1)]
    return [(random_nonzero(rng, 9), degree), *lower]


def _derivative(terms: Polynomial) -> Polynomial:
    return [(coefficient * power, power - 1) for coefficient, power in terms if power > 0]


def _sum_text(values: list[int]) -> str:
    return str(values[0]) + "".join(signed_term(value) for value in values[1:])


def _evaluation(terms: Polynomial, point: int) -> tuple[int, str]:
    """The value at `point`, and the working: `6(-2)^2 - 4(-2) + 5 = 24 + 8 + 5 = 37`."""
    values = [coefficient * point**power for coefficient, power in terms if coefficient != 0] or [0]
    return sum(values), chain(_polynomial(terms, f"({point})"), _sum_text(values), sum(values))


def _analysis_derivative(rng: random.Random) -> Example:
    terms = _random_polynomial(rng, rng.randint(2, 4))
    function = _polynomial(terms)
    prompt = rng.choice((f"Differentiate f(x) = {function}.", f"Find f'(x) for f(x) = {function}.",
                         f"What is the derivative of {function}?"))
    steps = ["Power rule, term by term: d/dx(c x^n) = c n x^(n-1)"]
    steps += [f"d/dx({_polynomial([term])}) = {_polynomial(_derivative([term]))}" for term in terms if term[0] != 0]
    return worked_example(prompt, steps, _polynomial(_derivative(terms)))


def _analysis_slope(rng: random.Random) -> Example:
    terms = _random_polynomial(rng, rng.randint(2, 3))
    point = rng.randint(-3, 3)
    slope, working = _evaluation(_derivative(terms), point)
    function = _polynomial(terms)
    prompt = rng.choice((f"Let f(x) = {function}. Find f'({point}).",
                         f"What is the slope of f(x) = {function} at x = {point}?"))
    steps = [f"By the power rule, f'(x) = {_polynomial(_derivative(terms))}", f"f'({point}) = {working}"]
    return worked_example(prompt, steps, slope)


def _analysis_limit_by_substitution(rng: random.Random) -> Example:
    terms = _random_polynomial(rng, rng.randint(2, 3))
    point = rng.randint(-4, 4)
    limit, working = _evaluation(terms, point)
    function = _polynomial(terms)
    prompt = rng.choice((f"Find the limit of {function} as x approaches {point}.",
                         f"Evaluate the limit as x -> {point} of {function}."))
    return worked_example(prompt, [f"A polynomial is continuous, so substitute x = {point}:", working], limit)


def _analysis_limit_by_cancelling(rng: random.Random) -> Example:
    a = random_nonzero(rng, 12)
    b = rng.choice([value for value in range(-12, 13) if value not in (0, a)])
    numerator = _polynomial([(1, 2), (-(a + b), 1), (a * b, 0)])
    vanishing, remaining = f"(x{signed_term(-a)})", f"x{signed_term(-b)}"
    prompt = rng.choice((f"Find the limit of ({numerator})/{vanishing} as x approaches {a}.",
                         f"Evaluate the limit as x -> {a} of ({numerator})/{vanishing}."))
    steps = [f"At x = {a} the fraction is 0/0, so factor: {numerator} = {vanishing}({remaining})",
             f"For x != {a} the fraction equals {remaining}",
             f"Substitute x = {a}: {chain(f'{paren_negative(a)}{signed_term(-b)}', a - b)}"]
    return worked_example(prompt, steps, a - b)


def _analysis_limit_at_infinity(rng: random.Random) -> Example:
    degree = rng.randint(1, 3)
    top, bottom = _random_polynomial(rng, degree), _random_polynomial(rng, degree)
    limit = Fraction(top[0][0], bottom[0][0])
    power = "x" if degree == 1 else f"x^{degree}"
    prompt = f"Find the limit of ({_polynomial(top)})/({_polynomial(bottom)}) as x goes to infinity."
    steps = [f"Both have degree {degree}; divide top and bottom by {power}, and the lower terms go to 0:",
             f"limit = {chain(f'{top[0][0]}/{paren_negative(bottom[0][0])}', limit)}"]
    return worked_example(prompt, steps, limit)


TEMPLATES: tuple[Template, ...] = (_analysis_derivative, _analysis_slope, _analysis_limit_by_substitution,
                                  _analysis_limit_by_cancelling, _analysis_limit_at_infinity)
