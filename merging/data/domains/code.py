"""Code: small Python functions, traced step by step; the answer is the return value."""

from __future__ import annotations

import random
from collections.abc import Callable

from merging.data.domains._working import Template, worked_example
from merging.data.example import Example

_FUNCTION_NAMES = ("f", "g", "calc", "run", "work", "step")
_RESULT_QUESTIONS = ("What does {call} return?", "What is the value of {call}?", "Trace {call} and give the result.")
_WORDS = ("cat", "robot", "apple", "merge", "tiny", "model", "plan", "data", "code", "lemon", "house", "river",
          "piano", "tiger", "cloud", "sun", "map", "gold", "frog", "train", "bird", "fish", "star", "moon", "leaf",
          "rock", "salt", "wind", "snow", "rain", "book", "lamp", "door", "ship", "ring", "milk", "seed", "bell")


def _code_example(rng: random.Random, code: list[str], call: str, trace: list[str], result: object) -> Example:
    prompt = "\n".join([*code, rng.choice(_RESULT_QUESTIONS).format(call=call)])
    return worked_example(prompt, trace, result)


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


TEMPLATES: tuple[Template, ...] = (_code_accumulate, _code_while, _code_filter, _code_pairs, _code_string)
