"""Nine procedurally generated problem domains, mirroring the nine domains of the merging scaling-law study.

Every example is a short prompt and a worked solution whose last line is `Answer: X`, with `Example.answer == X`.
Answers are right by construction: a template picks the solution first (the integer root, the Pythagorean triple,
the mRNA) and builds the problem around it, with exact integer, Fraction or Decimal arithmetic. Each domain mixes
several templates and phrasings, so that a tiny model learns the reasoning pattern rather than a few strings.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from fractions import Fraction

from merging.data.example import Example
from merging.errors import ConfigError
from merging.seeding import python_rng

DOMAINS: tuple[str, ...] = (
    "algebra", "analysis", "geometry", "discrete", "number_theory", "code", "chemistry", "physics", "biology",
)

Template = Callable[[random.Random], Example]

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


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def _example(prompt: str, steps: list[str], answer: object) -> Example:
    answer_text = str(answer)
    return Example(prompt=prompt, response="\n".join([*steps, f"Answer: {answer_text}"]), answer=answer_text)


def _signed(value: int | Fraction | Decimal) -> str:
    """` + 7` or ` - 4`, to follow another term; empty for zero, so that a zero term disappears."""
    if value == 0:
        return ""
    return f" + {value}" if value > 0 else f" - {-value}"


def _paren(value: int) -> str:
    """A negative number in parentheses, so that `12 / (-3)` cannot be read as a subtraction."""
    return f"({value})" if value < 0 else str(value)


def _nonzero(rng: random.Random, limit: int) -> int:
    return rng.choice((-1, 1)) * rng.randint(1, limit)


def _chain(*parts: object) -> str:
    """`a = b = c`, leaving out any part equal to the one before it (no `5 = 5`)."""
    shown = [str(parts[0])]
    for part in map(str, parts[1:]):
        if part != shown[-1]:
            shown.append(part)
    return " = ".join(shown)


def _sum_text(values: list[int]) -> str:
    return str(values[0]) + "".join(_signed(value) for value in values[1:])


def _product_text(factors: list[int]) -> str:
    return " * ".join(map(str, factors))


def _decimal_text(value: Decimal) -> str:
    """Exact decimal without trailing zeros: 98.0 -> 98, 91.250 -> 91.25."""
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _round_one_place(value: Decimal) -> Decimal:
    # Half up, the rule taught in school, rather than Decimal's default of half even.
    return value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def _approx(value: Decimal) -> str:
    """`value` cut to three decimals, marked `...` where that dropped digits."""
    cut = value.quantize(Decimal("0.001"), rounding=ROUND_DOWN)
    return _decimal_text(cut) + ("..." if cut != value else "")


# ---------------------------------------------------------------------------------------------------------------
# Algebra: linear equations with integer roots, solved by inverse operations.

_UNKNOWNS = "xyntm"
_SOLVE_PHRASINGS = ("Solve for {v}: {eq}", "Find {v} if {eq}.", "What value of {v} satisfies {eq}?",
                    "Solve {eq} for {v}.")


def _coefficient_term(coefficient: int, variable: str) -> str:
    """`3x`, `x`, `-x` or `-3x`."""
    if abs(coefficient) == 1:
        return variable if coefficient == 1 else f"-{variable}"
    return f"{coefficient}{variable}"


def _linear(coefficient: int, variable: str, constant: int) -> str:
    return _coefficient_term(coefficient, variable) + _signed(constant)


def _move_constant(constant: int) -> str:
    """How to remove `+ constant` from a side: `Subtract 7 from` or `Add 4 to`."""
    return f"Subtract {constant} from" if constant > 0 else f"Add {-constant} to"


def _solve_prompt(rng: random.Random, variable: str, equation: str) -> str:
    return rng.choice(_SOLVE_PHRASINGS).format(v=variable, eq=equation)


def _algebra_two_step(rng: random.Random) -> Example:
    variable, root = rng.choice(_UNKNOWNS), rng.randint(-12, 20)
    a, b = _nonzero(rng, 12), _nonzero(rng, 30)
    if abs(a) == 1:  # dividing by 1 would leave the second step with nothing to teach
        a *= 2
    c = a * root + b
    steps = [f"{_move_constant(b)} both sides: {_coefficient_term(a, variable)} = {c - b}",
             f"Divide both sides by {a}: {variable} = {c - b} / {_paren(a)} = {root}"]
    return _example(_solve_prompt(rng, variable, f"{_linear(a, variable, b)} = {c}"), steps, root)


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
    return _example(_solve_prompt(rng, variable, equation), steps, root)


def _algebra_brackets(rng: random.Random) -> Example:
    variable, root = rng.choice(_UNKNOWNS), rng.randint(-10, 15)
    a, b = rng.randint(2, 9), _nonzero(rng, 12)
    inner = root + b
    steps = [f"Divide both sides by {a}: {variable}{_signed(b)} = {a * inner} / {a} = {inner}",
             f"{_move_constant(b)} both sides: {variable} = {inner}{_signed(-b)} = {root}"]
    return _example(_solve_prompt(rng, variable, f"{a}({variable}{_signed(b)}) = {a * inner}"), steps, root)


def _algebra_fraction(rng: random.Random) -> Example:
    variable, quotient = rng.choice(_UNKNOWNS), rng.randint(-8, 12)
    a, b = rng.randint(2, 9), _nonzero(rng, 15)
    steps = [f"{_move_constant(b)} both sides: {variable}/{a} = {quotient + b}{_signed(-b)} = {quotient}",
             f"Multiply both sides by {a}: {variable} = {_paren(quotient)} * {a} = {quotient * a}"]
    return _example(_solve_prompt(rng, variable, f"{variable}/{a}{_signed(b)} = {quotient + b}"), steps, quotient * a)


# ---------------------------------------------------------------------------------------------------------------
# Analysis: derivatives by the power rule, limits by substitution, by cancelling a factor, or at infinity.

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
    return [(_nonzero(rng, 9), degree), *lower]


def _derivative(terms: Polynomial) -> Polynomial:
    return [(coefficient * power, power - 1) for coefficient, power in terms if power > 0]


def _evaluation(terms: Polynomial, point: int) -> tuple[int, str]:
    """The value at `point`, and the working: `6(-2)^2 - 4(-2) + 5 = 24 + 8 + 5 = 37`."""
    values = [coefficient * point**power for coefficient, power in terms if coefficient != 0] or [0]
    return sum(values), _chain(_polynomial(terms, f"({point})"), _sum_text(values), sum(values))


def _analysis_derivative(rng: random.Random) -> Example:
    terms = _random_polynomial(rng, rng.randint(2, 4))
    function = _polynomial(terms)
    prompt = rng.choice((f"Differentiate f(x) = {function}.", f"Find f'(x) for f(x) = {function}.",
                         f"What is the derivative of {function}?"))
    steps = ["Power rule, term by term: d/dx(c x^n) = c n x^(n-1)"]
    steps += [f"d/dx({_polynomial([term])}) = {_polynomial(_derivative([term]))}" for term in terms if term[0] != 0]
    return _example(prompt, steps, _polynomial(_derivative(terms)))


def _analysis_slope(rng: random.Random) -> Example:
    terms = _random_polynomial(rng, rng.randint(2, 3))
    point = rng.randint(-3, 3)
    slope, working = _evaluation(_derivative(terms), point)
    function = _polynomial(terms)
    prompt = rng.choice((f"Let f(x) = {function}. Find f'({point}).",
                         f"What is the slope of f(x) = {function} at x = {point}?"))
    steps = [f"By the power rule, f'(x) = {_polynomial(_derivative(terms))}", f"f'({point}) = {working}"]
    return _example(prompt, steps, slope)


def _analysis_limit_by_substitution(rng: random.Random) -> Example:
    terms = _random_polynomial(rng, rng.randint(2, 3))
    point = rng.randint(-4, 4)
    limit, working = _evaluation(terms, point)
    function = _polynomial(terms)
    prompt = rng.choice((f"Find the limit of {function} as x approaches {point}.",
                         f"Evaluate the limit as x -> {point} of {function}."))
    return _example(prompt, [f"A polynomial is continuous, so substitute x = {point}:", working], limit)


def _analysis_limit_by_cancelling(rng: random.Random) -> Example:
    a = _nonzero(rng, 12)
    b = rng.choice([value for value in range(-12, 13) if value not in (0, a)])
    numerator = _polynomial([(1, 2), (-(a + b), 1), (a * b, 0)])
    vanishing, remaining = f"(x{_signed(-a)})", f"x{_signed(-b)}"
    prompt = rng.choice((f"Find the limit of ({numerator})/{vanishing} as x approaches {a}.",
                         f"Evaluate the limit as x -> {a} of ({numerator})/{vanishing}."))
    steps = [f"At x = {a} the fraction is 0/0, so factor: {numerator} = {vanishing}({remaining})",
             f"For x != {a} the fraction equals {remaining}",
             f"Substitute x = {a}: {_chain(f'{_paren(a)}{_signed(-b)}', a - b)}"]
    return _example(prompt, steps, a - b)


def _analysis_limit_at_infinity(rng: random.Random) -> Example:
    degree = rng.randint(1, 3)
    top, bottom = _random_polynomial(rng, degree), _random_polynomial(rng, degree)
    limit = Fraction(top[0][0], bottom[0][0])
    power = "x" if degree == 1 else f"x^{degree}"
    prompt = f"Find the limit of ({_polynomial(top)})/({_polynomial(bottom)}) as x goes to infinity."
    steps = [f"Both have degree {degree}; divide top and bottom by {power}, and the lower terms go to 0:",
             f"limit = {_chain(f'{top[0][0]}/{_paren(bottom[0][0])}', limit)}"]
    return _example(prompt, steps, limit)


# ---------------------------------------------------------------------------------------------------------------
# Geometry: areas, perimeters and volumes, circles (pi kept as a symbol, or 3.14 with a stated rounding), Pythagoras.

_LENGTH_UNITS = ("cm", "m", "mm", "in", "ft")
_PYTHAGOREAN_TRIPLES = (
    (3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (20, 21, 29), (9, 40, 41), (12, 35, 37), (11, 60, 61),
    (28, 45, 53), (33, 56, 65), (16, 63, 65), (48, 55, 73), (13, 84, 85), (36, 77, 85), (39, 80, 89), (65, 72, 97),
)
_MAX_HYPOTENUSE = 150  # keeps the squares to sums a small model can learn
_PI = Decimal("3.14")


def _geometry_rectangle(rng: random.Random) -> Example:
    unit, length = rng.choice(_LENGTH_UNITS), rng.randint(3, 30)
    width = rng.randint(2, length - 1)
    shape = f"A rectangle is {length} {unit} long and {width} {unit} wide."
    if rng.randint(0, 1):
        prompt = rng.choice((f"{shape} What is its area in {unit}^2?",
                             f"Find the area of a {length} {unit} by {width} {unit} rectangle."))
        steps = [f"Area = length * width = {length} * {width} = {length * width}"]
        return _example(prompt, steps, length * width)
    prompt = rng.choice((f"{shape} What is its perimeter in {unit}?",
                         f"Find the perimeter of a {length} {unit} by {width} {unit} rectangle."))
    perimeter = 2 * (length + width)
    steps = [f"Perimeter = 2 * (length + width) = 2 * ({length} + {width}) = 2 * {length + width} = {perimeter}"]
    return _example(prompt, steps, perimeter)


def _geometry_triangle(rng: random.Random) -> Example:
    unit, base, height = rng.choice(_LENGTH_UNITS), rng.randint(2, 30), rng.randint(2, 30)
    prompt = rng.choice((f"A triangle has base {base} {unit} and height {height} {unit}. Find its area in {unit}^2.",
                         f"What is the area of a triangle with base {base} and height {height}?"))
    area = _decimal_text(Decimal(base * height) / 2)
    steps = [f"Area = base * height / 2 = {base} * {height} / 2 = {base * height} / 2 = {area}"]
    return _example(prompt, steps, area)


def _geometry_circle(rng: random.Random) -> Example:
    unit, radius = rng.choice(_LENGTH_UNITS), rng.randint(1, 30)
    given_diameter = rng.randint(0, 1) == 1
    measure = rng.choice(("area", "circumference"))
    exact = rng.randint(0, 1) == 1
    size = f"diameter {2 * radius}" if given_diameter else f"radius {radius}"
    rule = "Leave pi in the answer." if exact else "Use pi = 3.14 and round to one decimal place."
    steps = [f"r = d / 2 = {2 * radius} / 2 = {radius}"] if given_diameter else []
    if measure == "area":
        formula, with_radius, multiple = "Area = pi * r^2", f"{radius}^2", radius * radius
    else:
        formula, with_radius, multiple = "Circumference = 2 * pi * r", f"2 * {radius}", 2 * radius
    prompt = f"A circle has {size} {unit}. Find its {measure}. {rule}"
    if exact:
        answer = "pi" if multiple == 1 else f"{multiple}pi"
        steps.append(f"{formula} = pi * {with_radius} = {answer}")
        return _example(prompt, steps, answer)
    value = _PI * multiple
    steps.append(f"{formula} = {_chain(f'3.14 * {with_radius}', f'3.14 * {multiple}', _decimal_text(value))}")
    steps.append(f"Rounded to one decimal place: {_round_one_place(value)}")
    return _example(prompt, steps, _round_one_place(value))


def _geometry_box(rng: random.Random) -> Example:
    unit, length, width, height = rng.choice(_LENGTH_UNITS), rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 15)
    box = f"A box is {length} {unit} long, {width} {unit} wide and {height} {unit} high."
    if rng.randint(0, 1):
        prompt = rng.choice((f"{box} What is its volume in {unit}^3?",
                             f"Find the volume of a {length} by {width} by {height} cuboid."))
        steps = [f"Volume = length * width * height = {length} * {width} * {height} = {length * width * height}"]
        return _example(prompt, steps, length * width * height)
    prompt = rng.choice((f"{box} What is its surface area in {unit}^2?",
                         f"Find the surface area of a {length} by {width} by {height} cuboid."))
    faces = length * width + length * height + width * height
    steps = [f"Surface = 2 * (lw + lh + wh) = 2 * ({length * width} + {length * height} + {width * height}) "
             f"= 2 * {faces} = {2 * faces}"]
    return _example(prompt, steps, 2 * faces)


def _geometry_right_triangle(rng: random.Random) -> Example:
    triple = rng.choice(_PYTHAGOREAN_TRIPLES)
    scale = rng.randint(1, _MAX_HYPOTENUSE // triple[2])
    a, b, c = (scale * side for side in triple)
    if rng.randint(0, 1):
        a, b = b, a
    unit = rng.choice(_LENGTH_UNITS)
    if rng.randint(0, 1):
        prompt = rng.choice((f"A right triangle has legs {a} {unit} and {b} {unit}. How long is the hypotenuse?",
                             f"The legs of a right triangle are {a} and {b}. Find the hypotenuse."))
        steps = [f"c^2 = a^2 + b^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {c * c}", f"c = sqrt({c * c}) = {c}"]
        return _example(prompt, steps, c)
    prompt = f"A right triangle has hypotenuse {c} {unit} and one leg {a} {unit}. How long is the other leg?"
    steps = [f"b^2 = c^2 - a^2 = {c}^2 - {a}^2 = {c * c} - {a * a} = {b * b}", f"b = sqrt({b * b}) = {b}"]
    return _example(prompt, steps, b)


# ---------------------------------------------------------------------------------------------------------------
# Discrete mathematics: counting with permutations, combinations, factorials, repetition and the product rule.

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
    return _example(prompt, steps, math.prod(factors))


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
    return _example(prompt, steps, numerator // denominator)


def _discrete_arrangement(rng: random.Random) -> Example:
    n = rng.randint(3, 10)
    prompt = rng.choice((f"In how many different orders can {n} {rng.choice(_THINGS)} be lined up?",
                         f"How many ways can {n} {rng.choice(_PEOPLE)} stand in a line?",
                         f"In how many ways can {n} {rng.choice(_THINGS)} be placed on a shelf?"))
    steps = [f"Every order counts, so the answer is {n}!",
             f"{n}! = {_product_text(_falling(n, n))} = {math.factorial(n)}"]
    return _example(prompt, steps, math.factorial(n))


def _discrete_with_repetition(rng: random.Random) -> Example:
    n, r = rng.randint(2, 12), rng.randint(2, 5)
    prompt = rng.choice((f"How many {r}-letter strings can be made from {n} letters if letters may repeat?",
                         f"A lock has {r} dials with {n} symbols on each. How many settings are there?",
                         f"{r} {rng.choice(_PEOPLE)} each choose one of {n} {rng.choice(_SHAREABLE_CHOICES)}. "
                         "In how many ways can they choose?"))
    steps = [f"Each of the {r} positions has {n} choices, so the count is {n}^{r}",
             f"{_product_text([n] * r)} = {n**r}"]
    return _example(prompt, steps, n**r)


def _discrete_product_rule(rng: random.Random) -> Example:
    kinds = rng.choice(_CHOICE_KINDS)[:rng.randint(2, 4)]
    counts = [rng.randint(2, 12) for _ in kinds]
    offers = [f"{count} {kind}" for count, kind in zip(counts, kinds, strict=True)]
    prompt = f"There are {', '.join(offers[:-1])} and {offers[-1]}. In how many ways can one of each be chosen?"
    steps = ["Each choice is independent, so multiply the counts:", f"{_product_text(counts)} = {math.prod(counts)}"]
    return _example(prompt, steps, math.prod(counts))


# ---------------------------------------------------------------------------------------------------------------
# Number theory: Euclid's algorithm, prime factorisation and modular arithmetic.

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
    return _example(prompt, [*steps, f"The last nonzero remainder is {gcd}"], gcd)


def _number_theory_lcm(rng: random.Random) -> Example:
    a, b = _number_pair(rng, 12, 12)
    gcd, steps = _euclid(a, b)
    prompt = rng.choice((f"Find lcm({a}, {b}).", f"What is the least common multiple of {a} and {b}?"))
    steps = [*steps, f"gcd = {gcd}, so lcm = {a} * {b} / {gcd} = {a * b} / {gcd} = {a * b // gcd}"]
    return _example(prompt, steps, a * b // gcd)


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
    return _example(prompt, steps, " * ".join(map(str, powers)))


def _number_theory_remainder(rng: random.Random) -> Example:
    n, modulus = rng.randint(10, 999), rng.randint(3, 12)
    prompt = rng.choice((f"What is {n} mod {modulus}?", f"Find the remainder when {n} is divided by {modulus}."))
    steps = [f"Divide {n} by {modulus}: {n} = {n // modulus} * {modulus} + {n % modulus}",
             f"The remainder is {n % modulus}"]
    return _example(prompt, steps, n % modulus)


def _number_theory_modular_arithmetic(rng: random.Random) -> Example:
    x, y, modulus = rng.randint(10, 99), rng.randint(10, 99), rng.randint(3, 12)
    operator = rng.choice(("+", "*"))
    x_mod, y_mod = x % modulus, y % modulus
    combined = x_mod + y_mod if operator == "+" else x_mod * y_mod
    prompt = f"Compute ({x} {operator} {y}) mod {modulus}."
    steps = [f"Reduce first: {x} mod {modulus} = {x_mod} and {y} mod {modulus} = {y_mod}",
             f"{x_mod} {operator} {y_mod} = {combined}", f"{combined} mod {modulus} = {combined % modulus}"]
    return _example(prompt, steps, combined % modulus)


def _number_theory_power(rng: random.Random) -> Example:
    base, exponent, modulus = rng.randint(2, 15), rng.randint(2, 6), rng.randint(3, 13)
    prompt = rng.choice((f"Compute {base}^{exponent} mod {modulus}.",
                         f"What is the remainder of {base}^{exponent} divided by {modulus}?"))
    residue = base % modulus
    steps = [f"Multiply by {base} each step, reducing mod {modulus}:",
             f"{_chain(f'{base}^1', base, residue)} (mod {modulus})"]
    for power in range(2, exponent + 1):
        product = residue * base
        residue = product % modulus
        steps.append(f"{_chain(f'{base}^{power}', f'{product // base} * {base}', product, residue)} (mod {modulus})")
    return _example(prompt, steps, residue)


# ---------------------------------------------------------------------------------------------------------------
# Code: small Python functions, traced step by step; the answer is the return value.

_FUNCTION_NAMES = ("f", "g", "calc", "run", "work", "step")
_RESULT_QUESTIONS = ("What does {call} return?", "What is the value of {call}?", "Trace {call} and give the result.")
_WORDS = ("cat", "robot", "apple", "merge", "tiny", "model", "plan", "data", "code", "lemon", "house", "river",
          "piano", "tiger", "cloud", "sun", "map", "gold", "frog", "train", "bird", "fish", "star", "moon", "leaf",
          "rock", "salt", "wind", "snow", "rain", "book", "lamp", "door", "ship", "ring", "milk", "seed", "bell")


def _code_example(rng: random.Random, code: list[str], call: str, trace: list[str], result: object) -> Example:
    prompt = "\n".join([*code, rng.choice(_RESULT_QUESTIONS).format(call=call)])
    return _example(prompt, trace, result)


def _code_accumulate(rng: random.Random) -> Example:
    name, total = rng.choice(_FUNCTION_NAMES), rng.choice(("total", "acc", "s", "out"))
    k = rng.randint(1, 4)
    term_text, term = rng.choice((("i", lambda i: i), (f"i * {k}", lambda i: i * k), (f"i + {k}", lambda i: i + k)))
    multiply = rng.randint(0, 2) == 0
    operator, value = ("*", 1) if multiply else ("+", 0)
    start = rng.randint(1, 2) if multiply else rng.randint(0, 2)
    n = start + rng.randint(1, 3)
    code = [f"def {name}(n):", f"    {total} = {value}", f"    for i in range({start}, n + 1):",
            f"        {total} {operator}= {term_text}", f"    return {total}"]
    trace = []
    for i in range(start, n + 1):
        updated = value * term(i) if multiply else value + term(i)
        trace.append(f"i = {i}: {total} = {value} {operator} {term(i)} = {updated}")
        value = updated
    return _code_example(rng, code, f"{name}({n})", trace, value)


def _while_loop(rng: random.Random) -> tuple[int, str, Callable[[int], bool], str, Callable[[int], int]]:
    """A start value, the loop condition and the update, each as code text and as the function it computes."""
    kind = rng.choice(("halve", "subtract", "triple"))
    if kind == "halve":
        return rng.randint(6, 100), "x > 1", lambda x: x > 1, "x // 2", lambda x: x // 2
    if kind == "subtract":
        d, floor = rng.randint(2, 9), rng.randint(0, 5)
        return rng.randint(10, 40), f"x > {floor}", lambda x: x > floor, f"x - {d}", lambda x: x - d
    ceiling = rng.randint(20, 200)
    return rng.randint(1, 6), f"x < {ceiling}", lambda x: x < ceiling, "x * 3", lambda x: x * 3


def _code_while(rng: random.Random) -> Example:
    name, returned = rng.choice(_FUNCTION_NAMES), rng.choice(("steps", "x"))
    while True:  # redraw until the loop body runs one to five times, so the trace stays short
        start, condition, holds, update, step = _while_loop(rng)
        states = [start]
        while holds(states[-1]) and len(states) <= 6:
            states.append(step(states[-1]))
        if 2 <= len(states) <= 6:
            break
    code = [f"def {name}(x):", "    steps = 0", f"    while {condition}:", f"        x = {update}",
            "        steps += 1", f"    return {returned}"]
    trace = [f"x = {value}, steps = {count}" for count, value in enumerate(states)]
    trace.append(f"{condition} is false, so the loop stops")
    result = len(states) - 1 if returned == "steps" else states[-1]
    return _code_example(rng, code, f"{name}({start})", trace, result)


def _code_filter(rng: random.Random) -> Example:
    name, numbers = rng.choice(_FUNCTION_NAMES), [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
    threshold = rng.randint(3, 15)
    condition, holds = rng.choice((("x % 2 == 0", lambda x: x % 2 == 0), ("x % 2 == 1", lambda x: x % 2 == 1),
                                   ("x % 3 == 0", lambda x: x % 3 == 0), (f"x > {threshold}", lambda x: x > threshold),
                                   (f"x < {threshold}", lambda x: x < threshold)))
    counting = rng.randint(0, 1) == 1
    total = "count" if counting else "total"
    code = [f"def {name}(xs):", f"    {total} = 0", "    for x in xs:", f"        if {condition}:",
            f"            {total} += {1 if counting else 'x'}", f"    return {total}"]
    trace, value = [], 0
    for x in numbers:
        if holds(x):
            value += 1 if counting else x
            trace.append(f"x = {x}: yes, {total} = {value}")
        else:
            trace.append(f"x = {x}: no")
    return _code_example(rng, code, f"{name}({numbers})", trace, value)


def _code_pairs(rng: random.Random) -> Example:
    name, a, b, n = rng.choice(_FUNCTION_NAMES), rng.randint(0, 4), rng.randint(1, 5), rng.randint(2, 5)
    expression, combine = rng.choice((("a + b", lambda a, b: a + b), ("b - a", lambda a, b: b - a),
                                      ("a + 2 * b", lambda a, b: a + 2 * b)))
    code = [f"def {name}(n):", f"    a, b = {a}, {b}", "    for _ in range(n):", f"        a, b = b, {expression}",
            "    return a"]
    trace = [f"start: a = {a}, b = {b}"]
    for step in range(1, n + 1):
        a, b = b, combine(a, b)
        trace.append(f"step {step}: a = {a}, b = {b}")
    return _code_example(rng, code, f"{name}({n})", trace, a)


def _code_string(rng: random.Random) -> Example:
    name, word = rng.choice(_FUNCTION_NAMES), rng.choice(_WORDS)
    update, extend = rng.choice((("ch + out", lambda out, ch: ch + out),
                                 ("out + ch + ch", lambda out, ch: out + ch + ch),
                                 ("ch + out + ch", lambda out, ch: ch + out + ch)))
    code = [f"def {name}(s):", '    out = ""', "    for ch in s:", f"        out = {update}", "    return out"]
    trace, out = [], ""
    for ch in word:
        out = extend(out, ch)
        trace.append(f"ch = '{ch}': out = '{out}'")
    return _code_example(rng, code, f'{name}("{word}")', trace, out)


# ---------------------------------------------------------------------------------------------------------------
# Chemistry: molar masses from a small periodic table, moles and grams, mass percentages, balancing.

_ATOMIC_MASSES = {element: Decimal(mass) for element, mass in (
    ("H", "1.0"), ("Li", "7.0"), ("C", "12.0"), ("N", "14.0"), ("O", "16.0"), ("F", "19.0"), ("Na", "23.0"),
    ("Mg", "24.0"), ("Al", "27.0"), ("Si", "28.0"), ("P", "31.0"), ("S", "32.0"), ("Cl", "35.5"), ("K", "39.0"),
    ("Ca", "40.0"), ("Fe", "56.0"), ("Cu", "63.5"), ("Br", "80.0"),
)}
_NAMED_COMPOUNDS = (
    "H2O", "CO2", "CO", "NH3", "NaCl", "HCl", "H2SO4", "HNO3", "NaOH", "KOH", "CaCO3", "MgO", "CaO", "Fe2O3", "Al2O3",
    "SO2", "SO3", "NO2", "N2O", "H2O2", "KCl", "MgCl2", "CaCl2", "Na2CO3", "NaHCO3", "K2SO4", "Na2SO4", "CuSO4", "CuO",
    "H3PO4", "C6H12O6", "CH3COOH", "C12H22O11", "SiO2", "LiOH", "KNO3", "NaNO3", "HF", "MgSO4", "FeS", "AlCl3",
    "FeCl3", "HBr", "KBr", "NaBr", "LiF", "CaF2", "O2", "N2", "Cl2", "KF", "NaF", "MgF2", "Li2O", "K2O", "Na2O", "MgS",
    "CaS", "Na2S", "K2S", "LiCl", "LiBr", "CaBr2", "MgBr2", "Al2S3", "FeO", "Cu2O", "CuCl2", "FeCl2", "NH4Cl", "NaNO2",
    "Na3PO4", "K3PO4", "CaSO4", "CH2O", "HCOOH", "C2H2", "C6H6", "CCl4", "CHCl3", "PCl3", "SiCl4", "Mg3N2", "Li3N",
    "AlF3", "K2CO3", "Li2CO3", "MgCO3", "CaC2",
)


def _atoms(element: str, count: int) -> str:
    return element if count == 1 else f"{element}{count}"


_ALKANES = tuple(_atoms("C", n) + _atoms("H", 2 * n + 2) for n in range(1, 11))
_ALKENES = tuple(_atoms("C", n) + _atoms("H", 2 * n) for n in range(2, 9))
_ALCOHOLS = tuple(_atoms("C", n) + _atoms("H", 2 * n + 1) + "OH" for n in range(1, 7))
_COMPOUNDS = tuple(dict.fromkeys((*_NAMED_COMPOUNDS, *_ALKANES, *_ALKENES, *_ALCOHOLS)))
_MOLE_AMOUNTS = tuple(Decimal(quarters) / 4 for quarters in range(1, 41))
_FUELS = (*_ALKANES[:8], *_ALKENES, *_ALCOHOLS[:5])
Reaction = tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]  # reactants, products, balanced coefficients
_OTHER_REACTIONS: tuple[Reaction, ...] = (
    (("H2", "O2"), ("H2O",), (2, 1, 2)), (("N2", "H2"), ("NH3",), (1, 3, 2)), (("H2", "Cl2"), ("HCl",), (1, 1, 2)),
    (("KClO3",), ("KCl", "O2"), (2, 2, 3)), (("H2O2",), ("H2O", "O2"), (2, 2, 1)),
    (("CaCO3",), ("CaO", "CO2"), (1, 1, 1)),
    (("Na", "H2O"), ("NaOH", "H2"), (2, 2, 2, 1)), (("K", "H2O"), ("KOH", "H2"), (2, 2, 2, 1)),
    (("N2", "O2"), ("NO2",), (1, 2, 2)), (("SO2", "O2"), ("SO3",), (2, 1, 2)), (("P", "O2"), ("P2O5",), (4, 5, 2)),
    (("C", "O2"), ("CO",), (2, 1, 2)), (("Mg", "HCl"), ("MgCl2", "H2"), (1, 2, 1, 1)),
    (("Zn", "HCl"), ("ZnCl2", "H2"), (1, 2, 1, 1)), (("Al", "HCl"), ("AlCl3", "H2"), (2, 6, 2, 3)),
    (("Fe2O3", "CO"), ("Fe", "CO2"), (1, 3, 2, 3)), (("H2SO4", "NaOH"), ("Na2SO4", "H2O"), (1, 2, 1, 2)),
    (("Fe", "H2O"), ("Fe3O4", "H2"), (3, 4, 1, 4)), (("NH3", "O2"), ("NO", "H2O"), (4, 5, 4, 6)),
)
# Metals and non-metals with their usual valences: each pair makes one binary compound, as Al + Cl2 -> AlCl3.
_METALS = (("Li", 1), ("Na", 1), ("K", 1), ("Mg", 2), ("Ca", 2), ("Zn", 2), ("Cu", 2), ("Al", 3), ("Fe", 3))
_NON_METALS = (("O2", 2), ("Cl2", 1), ("Br2", 1), ("F2", 1), ("S", 2))  # no N2: most of its metal nitrides are exotic


def _element_counts(formula: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for element, digits in re.findall(r"([A-Z][a-z]?)(\d*)", formula):
        counts[element] = counts.get(element, 0) + int(digits or 1)
    return counts


def _molar_mass(formula: str) -> tuple[Decimal, str]:
    """The molar mass in g/mol and the line that works it out: `M(H2SO4) = 2 * 1 + 32 + 4 * 16 = 98 g/mol`."""
    counts = _element_counts(formula)
    total = sum((count * _ATOMIC_MASSES[element] for element, count in counts.items()), Decimal(0))
    masses = {element: _decimal_text(_ATOMIC_MASSES[element]) for element in counts}
    terms = [masses[element] if count == 1 else f"{count} * {masses[element]}" for element, count in counts.items()]
    return total, f"M({formula}) = {_chain(' + '.join(terms), _decimal_text(total))} g/mol"


def _synthesis(metal: str, metal_valence: int, non_metal: str, non_metal_valence: int) -> Reaction:
    """The metal and non-metal combining into their compound, with the smallest balancing coefficients."""
    ((element, atoms_per_molecule),) = _element_counts(non_metal).items()
    shared = math.gcd(metal_valence, non_metal_valence)
    metal_atoms, element_atoms = non_metal_valence // shared, metal_valence // shared  # per formula unit
    units = atoms_per_molecule // math.gcd(atoms_per_molecule, element_atoms)
    product = _atoms(metal, metal_atoms) + _atoms(element, element_atoms)
    return (metal, non_metal), (product,), (units * metal_atoms, units * element_atoms // atoms_per_molecule, units)


_REACTIONS = (*_OTHER_REACTIONS, *(_synthesis(*metal, *non_metal) for metal in _METALS for non_metal in _NON_METALS))
_MIXED_COMPOUNDS = tuple(compound for compound in _COMPOUNDS if len(_element_counts(compound)) > 1)


def _chemistry_molar_mass(rng: random.Random) -> Example:
    formula = rng.choice(_COMPOUNDS)
    prompt = rng.choice((f"What is the molar mass of {formula} in g/mol?", f"Compute the molar mass of {formula}.",
                         f"Find M({formula}) in g/mol.", f"Calculate the mass of one mole of {formula}.",
                         f"How many grams does one mole of {formula} weigh?"))
    counts = _element_counts(formula)
    parts = {element: count * _ATOMIC_MASSES[element] for element, count in counts.items()}
    steps = ["Add up the atomic masses of all the atoms:"]
    steps += [f"{element}: {counts[element]} * {_decimal_text(_ATOMIC_MASSES[element])} = {_decimal_text(part)}"
              for element, part in parts.items()]
    total = sum(parts.values(), Decimal(0))
    addition = " + ".join(_decimal_text(part) for part in parts.values())
    steps.append(f"M = {_chain(addition, _decimal_text(total))} g/mol")
    return _example(prompt, steps, _decimal_text(total))


def _chemistry_mass_from_moles(rng: random.Random) -> Example:
    formula, moles = rng.choice(_COMPOUNDS), rng.choice(_MOLE_AMOUNTS)
    molar_mass, working = _molar_mass(formula)
    mass = _decimal_text(moles * molar_mass)
    prompt = rng.choice((f"What is the mass of {moles} mol of {formula} in grams?",
                         f"How many grams do {moles} mol of {formula} weigh?"))
    steps = [working, f"m = n * M = {moles} * {_decimal_text(molar_mass)} = {mass} g"]
    return _example(prompt, steps, mass)


def _chemistry_moles_from_mass(rng: random.Random) -> Example:
    formula, moles = rng.choice(_COMPOUNDS), rng.choice(_MOLE_AMOUNTS)
    molar_mass, working = _molar_mass(formula)
    mass = _decimal_text(moles * molar_mass)
    prompt = rng.choice((f"How many moles are in {mass} g of {formula}?",
                         f"A sample of {formula} weighs {mass} g. How many moles is that?"))
    steps = [working, f"n = m / M = {mass} / {_decimal_text(molar_mass)} = {moles} mol"]
    return _example(prompt, steps, moles)


def _chemistry_mass_percent(rng: random.Random) -> Example:
    formula = rng.choice(_MIXED_COMPOUNDS)
    element, count = rng.choice(list(_element_counts(formula).items()))
    molar_mass, working = _molar_mass(formula)
    part = count * _ATOMIC_MASSES[element]
    percent = part * 100 / molar_mass
    prompt = rng.choice((f"What percentage of the mass of {formula} is {element}? Round to one decimal place.",
                         f"Find the mass percentage of {element} in {formula}, to one decimal place."))
    steps = [working, f"{element}: {count} * {_decimal_text(_ATOMIC_MASSES[element])} = {_decimal_text(part)}",
             f"{_decimal_text(part)} / {_decimal_text(molar_mass)} * 100 = {_approx(percent)}",
             f"Rounded to one decimal place: {_round_one_place(percent)}"]
    return _example(prompt, steps, _round_one_place(percent))


def _equation_text(reaction: Reaction) -> str:
    reactants, products, coefficients = reaction
    species = [("" if k == 1 else str(k)) + formula for formula, k in zip((*reactants, *products), coefficients,
                                                                          strict=True)]
    return f"{' + '.join(species[:len(reactants)])} -> {' + '.join(species[len(reactants):])}"


def _combustion(fuel: str) -> tuple[Reaction, list[str]]:
    """The balanced burning of a hydrocarbon or alcohol in oxygen, worked element by element."""
    counts = _element_counts(fuel)
    carbon, hydrogen, fuel_oxygen = counts["C"], counts["H"], counts.get("O", 0)
    water = hydrogen // 2
    oxygen_atoms = 2 * carbon + water - fuel_oxygen
    steps = [f"C: {carbon} C atoms make {carbon} CO2", f"H: {hydrogen} H atoms make {water} H2O",
             f"O: {2 * carbon} + {water}{_signed(-fuel_oxygen)} = {oxygen_atoms} atoms from O2, "
             f"so {Fraction(oxygen_atoms, 2)} O2"]
    if oxygen_atoms % 2:
        steps.append("Double every coefficient to clear the fraction")
        return ((fuel, "O2"), ("CO2", "H2O"), (2, oxygen_atoms, 2 * carbon, 2 * water)), steps
    return ((fuel, "O2"), ("CO2", "H2O"), (1, oxygen_atoms // 2, carbon, water)), steps


def _atom_totals(species: tuple[str, ...], coefficients: tuple[int, ...]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for formula, k in zip(species, coefficients, strict=True):
        for element, count in _element_counts(formula).items():
            totals[element] = totals.get(element, 0) + k * count
    return totals


def _chemistry_balance(rng: random.Random) -> Example:
    if rng.randint(0, 1):
        reaction, steps = _combustion(rng.choice(_FUELS))
    else:
        reaction = rng.choice(_REACTIONS)
        reactants, products, coefficients = reaction
        left = _atom_totals(reactants, coefficients[:len(reactants)])
        right = _atom_totals(products, coefficients[len(reactants):])
        steps = [f"Coefficients {', '.join(map(str, coefficients))} balance every element:"]
        steps += [f"{element}: {left[element]} left, {right[element]} right" for element in left]
    unbalanced = _equation_text((reaction[0], reaction[1], (1,) * len(reaction[2])))
    prompt = rng.choice((f"Balance the equation: {unbalanced}",
                         f"Balance {unbalanced} with the smallest whole numbers.",
                         f"Find the smallest whole-number coefficients that balance {unbalanced}."))
    return _example(prompt, steps, _equation_text(reaction))


# ---------------------------------------------------------------------------------------------------------------
# Physics: constant-acceleration kinematics and unit conversions, exact or with a stated rounding.

_MOVERS = ("car", "cyclist", "train", "runner", "cart", "boat", "sled", "ball")
Conversion = tuple[str, str, int]  # larger unit, smaller unit, how many of the smaller make one of the larger
_CONVERSIONS: tuple[Conversion, ...] = (
    ("h", "s", 3600), ("min", "s", 60), ("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("L", "mL", 1000),
    ("h", "min", 60), ("cm", "mm", 10), ("m", "mm", 1000), ("g", "mg", 1000), ("t", "kg", 1000), ("kJ", "J", 1000),
    ("kW", "W", 1000),
)
_KMH_PER_MS = Decimal("3.6")  # 1 m/s = 3600 m/h = 3.6 km/h


def _moving(mover: str, speed: int) -> str:
    return f"A {mover} starts from rest and" if speed == 0 else f"A {mover} moving at {speed} m/s"


def _physics_final_speed(rng: random.Random) -> Example:
    mover, u, a, t = rng.choice(_MOVERS), rng.randint(0, 20), rng.randint(1, 9), rng.randint(1, 12)
    prompt = f"{_moving(mover, u)} accelerates at {a} m/s^2 for {t} s. What is its final speed in m/s?"
    steps = [f"v = u + a * t = {_chain(f'{u} + {a} * {t}', f'{u} + {a * t}', u + a * t)}"]
    return _example(prompt, steps, u + a * t)


def _physics_distance(rng: random.Random) -> Example:
    mover, u, a, t = rng.choice(_MOVERS), rng.randint(0, 15), rng.randint(1, 8), rng.randint(1, 10)
    half = Decimal(a * t * t) / 2
    distance = _decimal_text(u * t + half)
    prompt = f"{_moving(mover, u)} accelerates at {a} m/s^2 for {t} s. How far does it travel in metres?"
    working = _chain(f"{u} * {t} + {a} * {t}^2 / 2", f"{u * t} + {a * t * t} / 2", f"{u * t} + {_decimal_text(half)}",
                     distance)
    steps = [f"s = u * t + a * t^2 / 2 = {working}"]
    return _example(prompt, steps, distance)


def _physics_time(rng: random.Random) -> Example:
    mover, u, a, t = rng.choice(_MOVERS), rng.randint(0, 20), rng.randint(1, 9), rng.randint(1, 12)
    v = u + a * t
    prompt = f"A {mover} speeds up from {u} m/s to {v} m/s at {a} m/s^2. How many seconds does it take?"
    steps = [f"t = (v - u) / a = ({v} - {u}) / {a} = {v - u} / {a} = {t}"]
    return _example(prompt, steps, t)


def _speed_question(rng: random.Random, speed: int, unit: str, target: str, rounding: str) -> str:
    return rng.choice((f"Convert {speed} {unit} to {target}{rounding}.",
                       f"A {rng.choice(_MOVERS)} moves at {speed} {unit}. What is that in {target}{rounding}?"))


def _physics_speed_units(rng: random.Random) -> Example:
    if rng.randint(0, 1):
        speed = rng.randint(2, 60)
        converted = _decimal_text(speed * _KMH_PER_MS)
        steps = ["1 m/s = 3.6 km/h, so multiply by 3.6", f"{speed} * 3.6 = {converted}"]
        return _example(_speed_question(rng, speed, "m/s", "km/h", ""), steps, converted)
    speed = rng.randint(10, 150)
    exact = speed / _KMH_PER_MS
    steps = ["1 km/h = 1000 m / 3600 s, so divide by 3.6", f"{speed} / 3.6 = {_approx(exact)}"]
    if _round_one_place(exact) == exact:
        return _example(_speed_question(rng, speed, "km/h", "m/s", ""), steps, _decimal_text(exact))
    steps.append(f"Rounded to one decimal place: {_round_one_place(exact)}")
    prompt = _speed_question(rng, speed, "km/h", "m/s", ", rounded to one decimal place")
    return _example(prompt, steps, _round_one_place(exact))


def _physics_unit_conversion(rng: random.Random) -> Example:
    larger, smaller, factor = rng.choice(_CONVERSIONS)
    amount = Decimal(rng.randint(1, 40)) / 2
    in_smaller = _decimal_text(amount * factor)
    if rng.randint(0, 1):
        steps = [f"1 {larger} = {factor} {smaller}, so multiply by {factor}",
                 f"{_decimal_text(amount)} * {factor} = {in_smaller}"]
        return _example(f"Convert {_decimal_text(amount)} {larger} to {smaller}.", steps, in_smaller)
    steps = [f"1 {larger} = {factor} {smaller}, so divide by {factor}",
             f"{in_smaller} / {factor} = {_decimal_text(amount)}"]
    return _example(f"How many {larger} is {in_smaller} {smaller}?", steps, _decimal_text(amount))


def _physics_average_speed(rng: random.Random) -> Example:
    speed, time = rng.randint(4, 120), Decimal(rng.randint(1, 10)) / 2
    distance = _decimal_text(speed * time)
    prompt = (f"A {rng.choice(_MOVERS)} covers {distance} km in {_decimal_text(time)} h. "
              "What is its average speed in km/h?")
    steps = [f"v = d / t = {distance} / {_decimal_text(time)} = {speed}"]
    return _example(prompt, steps, speed)


# ---------------------------------------------------------------------------------------------------------------
# Biology: DNA to mRNA to protein with the standard genetic code, stopping at the first stop codon.

_RNA_BASES = "UCAG"
# The standard code in the textbook table's order (first base slowest, third fastest); * marks a stop codon.
_AMINO_ACIDS_BY_CODON = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
_CODON_TABLE = {first + second + third: _AMINO_ACIDS_BY_CODON[16 * i + 4 * j + k]
                for i, first in enumerate(_RNA_BASES) for j, second in enumerate(_RNA_BASES)
                for k, third in enumerate(_RNA_BASES)}
_STOP = "*"
_SENSE_CODONS = tuple(codon for codon, amino_acid in _CODON_TABLE.items() if amino_acid != _STOP)
_STOP_CODONS = tuple(codon for codon, amino_acid in _CODON_TABLE.items() if amino_acid == _STOP)
_THREE_LETTER = {
    "A": "Ala", "R": "Arg", "N": "Asn", "D": "Asp", "C": "Cys", "Q": "Gln", "E": "Glu", "G": "Gly", "H": "His",
    "I": "Ile", "L": "Leu", "K": "Lys", "M": "Met", "F": "Phe", "P": "Pro", "S": "Ser", "T": "Thr", "W": "Trp",
    "Y": "Tyr", "V": "Val",
}
_TEMPLATE_TO_MRNA = str.maketrans("ACGT", "UGCA")
_MRNA_TO_TEMPLATE = str.maketrans("ACGU", "TGCA")


def _random_gene(rng: random.Random) -> str:
    """mRNA of a start codon, a few sense codons and a stop codon, sometimes with codons after the stop that
    translation must ignore."""
    codons = ["AUG", *(rng.choice(_SENSE_CODONS) for _ in range(rng.randint(1, 3))), rng.choice(_STOP_CODONS)]
    codons += [rng.choice(tuple(_CODON_TABLE)) for _ in range(rng.randint(0, 1))]
    return "".join(codons)


def _codons(sequence: str) -> list[str]:
    return [sequence[i:i + 3] for i in range(0, len(sequence), 3)]


def _translation(mrna: str, three_letter: bool) -> tuple[list[str], str]:
    """The codon and translation lines, and the protein: `MAG` or `Met-Ala-Gly`."""
    codons = _codons(mrna)
    names, read = [], []
    for codon in codons:
        amino_acid = _CODON_TABLE[codon]
        read.append(f"{codon}={'stop' if amino_acid == _STOP else _amino_acid_name(amino_acid, three_letter)}")
        if amino_acid == _STOP:
            break
        names.append(_amino_acid_name(amino_acid, three_letter))
    steps = [f"Codons: {' '.join(codons)}", " ".join(read)]
    return steps, "-".join(names) if three_letter else "".join(names)


def _amino_acid_name(letter: str, three_letter: bool) -> str:
    return _THREE_LETTER[letter] if three_letter else letter


def _code_style(rng: random.Random) -> tuple[bool, str]:
    three_letter = rng.randint(0, 1) == 1
    return three_letter, "three-letter" if three_letter else "one-letter"


def _biology_coding_strand(rng: random.Random) -> Example:
    mrna = _random_gene(rng)
    three_letter, style = _code_style(rng)
    prompt = rng.choice((f"The coding strand of a gene is {mrna.replace('U', 'T')}. Give its protein in {style} codes.",
                         f"Translate the DNA coding strand {mrna.replace('U', 'T')} into protein ({style} codes)."))
    steps, protein = _translation(mrna, three_letter)
    return _example(prompt, [f"mRNA is the coding strand with T -> U: {mrna}", *steps], protein)


def _biology_template_strand(rng: random.Random) -> Example:
    mrna = _random_gene(rng)
    three_letter, style = _code_style(rng)
    prompt = (f"The template strand (3' to 5') of a gene is {mrna.translate(_MRNA_TO_TEMPLATE)}. "
              f"Give its protein in {style} codes.")
    steps, protein = _translation(mrna, three_letter)
    return _example(prompt, [f"mRNA pairs with the template (A-U, T-A, G-C, C-G): {mrna}", *steps], protein)


def _biology_mrna(rng: random.Random) -> Example:
    mrna = _random_gene(rng)
    three_letter, style = _code_style(rng)
    prompt = rng.choice((f"Translate the mRNA {mrna} into protein ({style} codes).",
                         f"Which protein does the mRNA {mrna} encode? Use {style} codes."))
    steps, protein = _translation(mrna, three_letter)
    return _example(prompt, ["Read from the start codon AUG in groups of three:", *steps], protein)


def _biology_transcription(rng: random.Random) -> Example:
    template = "".join(rng.choice("ACGT") for _ in range(rng.randint(9, 18)))
    mrna = template.translate(_TEMPLATE_TO_MRNA)
    prompt = rng.choice((f"Transcribe the DNA template strand {template} into mRNA.",
                         f"Which mRNA is made from the DNA template strand {template}?"))
    # Groups of three are easier to pair up, for a reader and for a small model, than one long run of bases.
    steps = ["Pair each base: A->U, T->A, G->C, C->G", f"{' '.join(_codons(template))} -> {' '.join(_codons(mrna))}"]
    return _example(prompt, steps, mrna)


# ---------------------------------------------------------------------------------------------------------------

_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "algebra": (_algebra_two_step, _algebra_both_sides, _algebra_brackets, _algebra_fraction),
    "analysis": (_analysis_derivative, _analysis_slope, _analysis_limit_by_substitution, _analysis_limit_by_cancelling,
                 _analysis_limit_at_infinity),
    "geometry": (_geometry_rectangle, _geometry_triangle, _geometry_circle, _geometry_box, _geometry_right_triangle),
    "discrete": (_discrete_permutation, _discrete_combination, _discrete_arrangement, _discrete_with_repetition,
                 _discrete_product_rule),
    "number_theory": (_number_theory_gcd, _number_theory_lcm, _number_theory_factorisation, _number_theory_remainder,
                      _number_theory_modular_arithmetic, _number_theory_power),
    "code": (_code_accumulate, _code_while, _code_filter, _code_pairs, _code_string),
    "chemistry": (_chemistry_molar_mass, _chemistry_mass_from_moles, _chemistry_moles_from_mass,
                  _chemistry_mass_percent, _chemistry_balance),
    "physics": (_physics_final_speed, _physics_distance, _physics_time, _physics_speed_units, _physics_unit_conversion,
                _physics_average_speed),
    "biology": (_biology_coding_strand, _biology_template_strand, _biology_mrna, _biology_transcription),
}
