"""Geometry: areas, perimeters and volumes, circles (pi as a symbol, or 3.14 with a stated rounding), Pythagoras."""

from __future__ import annotations

import random
from decimal import Decimal

from merging.data.domains._working import Template, chain, decimal_text, round_one_place, worked_example
from merging.data.example import Example

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
        return worked_example(prompt, steps, length * width)
    prompt = rng.choice((f"{shape} What is its perimeter in {unit}?",
                         f"Find the perimeter of a {length} {unit} by {width} {unit} rectangle."))
    perimeter = 2 * (length + width)
    steps = [f"Perimeter = 2 * (length + width) = 2 * ({length} + {width}) = 2 * {length + width} = {perimeter}"]
    return worked_example(prompt, steps, perimeter)


def _geometry_triangle(rng: random.Random) -> Example:
    unit, base, height = rng.choice(_LENGTH_UNITS), rng.randint(2, 30), rng.randint(2, 30)
    prompt = rng.choice((f"A triangle has base {base} {unit} and height {height} {unit}. Find its area in {unit}^2.",
                         f"What is the area of a triangle with base {base} and height {height}?"))
    area = decimal_text(Decimal(base * height) / 2)
    steps = [f"Area = base * height / 2 = {base} * {height} / 2 = {base * height} / 2 = {area}"]
    return worked_example(prompt, steps, area)


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
        return worked_example(prompt, steps, answer)
    value = _PI * multiple
    steps.append(f"{formula} = {chain(f'3.14 * {with_radius}', f'3.14 * {multiple}', decimal_text(value))}")
    steps.append(f"Rounded to one decimal place: {round_one_place(value)}")
    return worked_example(prompt, steps, round_one_place(value))


def _geometry_box(rng: random.Random) -> Example:
    unit, length, width, height = rng.choice(_LENGTH_UNITS), rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 15)
    box = f"A box is {length} {unit} long, {width} {unit} wide and {height} {unit} high."
    if rng.randint(0, 1):
        prompt = rng.choice((f"{box} What is its volume in {unit}^3?",
                             f"Find the volume of a {length} by {width} by {height} cuboid."))
        steps = [f"Volume = length * width * height = {length} * {width} * {height} = {length * width * height}"]
        return worked_example(prompt, steps, length * width * height)
    prompt = rng.choice((f"{box} What is its surface area in {unit}^2?",
                         f"Find the surface area of a {length} by {width} by {height} cuboid."))
    faces = length * width + length * height + width * height
    steps = [f"Surface = 2 * (lw + lh + wh) = 2 * ({length * width} + {length * height} + {width * height}) "
             f"= 2 * {faces} = {2 * faces}"]
    return worked_example(prompt, steps, 2 * faces)


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
        return worked_example(prompt, steps, c)
    prompt = f"A right triangle has hypotenuse {c} {unit} and one leg {a} {unit}. How long is the other leg?"
    steps = [f"b^2 = c^2 - a^2 = {c}^2 - {a}^2 = {c * c} - {a * a} = {b * b}", f"b = sqrt({b * b}) = {b}"]
    return worked_example(prompt, steps, b)


TEMPLATES: tuple[Template, ...] = (_geometry_rectangle, _geometry_triangle, _geometry_circle, _geometry_box,
                                  _geometry_right_triangle)
