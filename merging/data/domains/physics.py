"""Physics: constant-acceleration kinematics and unit conversions, exact or with a stated rounding."""

from __future__ import annotations

import random
from decimal import Decimal

from merging.data.domains._working import Template, approx_text, chain, decimal_text, round_one_place, worked_example
from merging.data.example import Example

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
    steps = [f"v = u + a * t = {chain(f'{u} + {a} * {t}', f'{u} + {a * t}', u + a * t)}"]
    return worked_example(prompt, steps, u + a * t)


def _physics_distance(rng: random.Random) -> Example:
    mover, u, a, t = rng.choice(_MOVERS), rng.randint(0, 15), rng.randint(1, 8), rng.randint(1, 10)
    half = Decimal(a * t * t) / 2
    distance = decimal_text(u * t + half)
    prompt = f"{_moving(mover, u)} accelerates at {a} m/s^2 for {t} s. How far does it travel in metres?"
    working = chain(f"{u} * {t} + {a} * {t}^2 / 2", f"{u * t} + {a * t * t} / 2", f"{u * t} + {decimal_text(half)}",
                     distance)
    steps = [f"s = u * t + a * t^2 / 2 = {working}"]
    return worked_example(prompt, steps, distance)


def _physics_time(rng: random.Random) -> Example:
    mover, u, a, t = rng.choice(_MOVERS), rng.randint(0, 20), rng.randint(1, 9), rng.randint(1, 12)
    v = u + a * t
    prompt = f"A {mover} speeds up from {u} m/s to {v} m/s at {a} m/s^2. How many seconds does it take?"
    steps = [f"t = (v - u) / a = ({v} - {u}) / {a} = {v - u} / {a} = {t}"]
    return worked_example(prompt, steps, t)


def _speed_question(rng: random.Random, speed: int, unit: str, target: str, rounding: str) -> str:
    return rng.choice((f"Convert {speed} {unit} to {target}{rounding}.",
                       f"A {rng.choice(_MOVERS)} moves at {speed} {unit}. What is that in {target}{rounding}?"))


def _physics_speed_units(rng: random.Random) -> Example:
    if rng.randint(0, 1):
        speed = rng.randint(2, 60)
        converted = decimal_text(speed * _KMH_PER_MS)
        steps = ["1 m/s = 3.6 km/h, so multiply by 3.6", f"{speed} * 3.6 = {converted}"]
        return worked_example(_speed_question(rng, speed, "m/s", "km/h", ""), steps, converted)
    speed = rng.randint(10, 150)
    exact = speed / _KMH_PER_MS
    steps = ["1 km/h = 1000 m / 3600 s, so divide by 3.6", f"{speed} / 3.6 = {approx_text(exact)}"]
    if round_one_place(exact) == exact:
        return worked_example(_speed_question(rng, speed, "km/h", "m/s", ""), steps, decimal_text(exact))
    steps.append(f"Rounded to one decimal place: {round_one_place(exact)}")
    prompt = _speed_question(rng, speed, "km/h", "m/s", ", rounded to one decimal place")
    return worked_example(prompt, steps, round_one_place(exact))


def _physics_unit_conversion(rng: random.Random) -> Example:
    larger, smaller, factor = rng.choice(_CONVERSIONS)
    amount = Decimal(rng.randint(1, 40)) / 2
    in_smaller = decimal_text(amount * factor)
    if rng.randint(0, 1):
        steps = [f"1 {larger} = {factor} {smaller}, so multiply by {factor}",
                 f"{decimal_text(amount)} * {factor} = {in_smaller}"]
        return worked_example(f"Convert {decimal_text(amount)} {larger} to {smaller}.", steps, in_smaller)
    steps = [f"1 {larger} = {factor} {smaller}, so divide by {factor}",
             f"{in_smaller} / {factor} = {decimal_text(amount)}"]
    return worked_example(f"How many {larger} is {in_smaller} {smaller}?", steps, decimal_text(amount))


def _physics_average_speed(rng: random.Random) -> Example:
    speed, time = rng.randint(4, 120), Decimal(rng.randint(1, 10)) / 2
    distance = decimal_text(speed * time)
    prompt = (f"A {rng.choice(_MOVERS)} covers {distance} km in {decimal_text(time)} h. "
              "What is its average speed in km/h?")
    steps = [f"v = d / t = {distance} / {decimal_text(time)} = {speed}"]
    return worked_example(prompt, steps, speed)


TEMPLATES: tuple[Template, ...] = (_physics_final_speed, _physics_distance, _physics_time, _physics_speed_units,
                                  _physics_unit_conversion, _physics_average_speed)
