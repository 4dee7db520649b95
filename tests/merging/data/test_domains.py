"""The nine synthetic domains: determinism, format, disjoint splits, and answers recomputed independently of the
generator, from the prompt alone (its equation, numbers, formula, code or DNA) with math, eval, exec, and tables of
atomic masses, unit factors and codons written out here."""

import math
import re
from fractions import Fraction

import pytest

from merging.data import domains
from merging.data.domains import DOMAINS, generate, make_splits
from merging.data.example import Example
from merging.errors import ConfigError

SAMPLE = 200


def sample(domain: str) -> list[Example]:
    return generate(domain, SAMPLE, seed=11)


def test_the_nine_domains_of_the_study():
    assert DOMAINS == ("algebra", "analysis", "geometry", "discrete", "number_theory", "code", "chemistry", "physics",
                       "biology")


@pytest.mark.parametrize("domain", DOMAINS)
def test_generation_is_deterministic_and_depends_on_the_seed(domain):
    first = generate(domain, 30, seed=5)
    assert first == generate(domain, 30, seed=5)
    assert first != generate(domain, 30, seed=6)


def test_generation_is_the_same_in_every_process():
    # Python's hash() is salted per process: a fixed expected example would fail on most runs if it were used.
    assert generate("number_theory", 1, seed=0) == [Example(
        prompt="What is the greatest common divisor of 25 and 15?",
        response="25 = 1 * 15 + 10\n15 = 1 * 10 + 5\n10 = 2 * 5 + 0\nThe last nonzero remainder is 5\nAnswer: 5",
        answer="5")]


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_response_ends_with_its_answer_and_fits_a_small_context(domain):
    examples = sample(domain)
    for example in examples:
        lines = example.response.splitlines()
        assert example.answer and lines[-1] == f"Answer: {example.answer}", example
        assert sum(line.startswith("Answer:") for line in lines) == 1, example
        assert 60 <= len(example.prompt) + len(example.response) <= 300, example
        assert (example.prompt + example.response).isascii(), example
    assert len({example.prompt for example in examples}) >= 0.9 * len(examples)


PLAIN_ARITHMETIC = re.compile(r"[-+*/^(). \d]*\d[-+*/^(). \d]*")


def arithmetic_value(text: str) -> Fraction | None:
    """The exact value of a step such as `2 * (7 + 4)`, `6(-2)^2` or `Cl: 3 * 35.5`; None for anything else."""
    text = re.sub(r" (?:g|g/mol|mol)$", "", text.rsplit(": ", 1)[-1])
    if "..." in text or not PLAIN_ARITHMETIC.fullmatch(text):
        return None
    python = re.sub(r"\d+(?:\.\d+)?", lambda number: f"Fraction('{number[0]}')", re.sub(r"([\d)])\(", r"\1*(", text))
    return eval(python.replace("^", "**"), {"Fraction": Fraction})


@pytest.mark.parametrize("domain", [domain for domain in DOMAINS if domain != "biology"])  # DNA has no arithmetic
def test_every_worked_equality_holds(domain):
    checked = 0
    for example in sample(domain):
        for line in example.response.splitlines():
            if "(mod " in line:  # a chain of congruences, not of equalities
                continue
            values = [arithmetic_value(part) for part in line.split(" = ")]
            for left, right in zip(values, values[1:], strict=False):
                if left is not None and right is not None:
                    assert left == right, (line, example)
                    checked += 1
    assert checked >= SAMPLE // 2, checked


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_have_the_requested_sizes_and_share_no_prompt(domain):
    sizes = {"train": 2000, "calib": 16, "eval": 200}  # the sizes the zoo asks for
    splits = make_splits(domain, sizes, seed=1)
    assert list(splits) == list(sizes)
    assert {name: len(examples) for name, examples in splits.items()} == sizes
    prompts = [example.prompt for examples in splits.values() for example in examples]
    assert len(set(prompts)) == len(prompts)
    assert splits == make_splits(domain, sizes, seed=1)


def test_evaluation_split_stays_put_when_the_training_split_grows():
    small = make_splits("chemistry", {"train": 100, "eval": 40}, seed=2)
    large = make_splits("chemistry", {"train": 400, "eval": 40}, seed=2)
    assert small["eval"] == large["eval"]


def test_a_domain_that_runs_out_of_distinct_prompts_is_refused(monkeypatch):
    def five_prompts(rng):
        number = rng.randint(1, 5)
        return Example(f"prompt {number}", f"Answer: {number}", str(number))

    monkeypatch.setitem(domains._TEMPLATES, "discrete", (five_prompts,))
    assert len(make_splits("discrete", {"train": 3, "eval": 2}, seed=0)["train"]) == 3
    with pytest.raises(ConfigError, match=r"domain 'discrete' .* 6 requested"):
        make_splits("discrete", {"train": 4, "eval": 2}, seed=0)


def test_a_negative_split_size_is_refused():
    with pytest.raises(ConfigError, match="split 'eval' of domain 'physics' has size -1"):
        make_splits("physics", {"train": 10, "eval": -1}, seed=0)


@pytest.mark.parametrize("make", [lambda: generate("poetry", 3, seed=0),
                                  lambda: make_splits("poetry", {"train": 3}, seed=0)])
def test_an_unknown_domain_is_refused(make):
    with pytest.raises(ConfigError) as error:
        make()
    assert str(error.value) == ("unknown domain 'poetry'; choose one of algebra, analysis, geometry, discrete, "
                                "number_theory, code, chemistry, physics, biology")


# ---------------------------------------------------------------------------------------------------------------
# Answers recomputed from the prompts


def evaluate(expression: str, variable: str, value: object) -> Fraction:
    """`3x^2 - 4(x + 1)` at variable = value, exactly: implied products made explicit, then Python's eval."""
    python = re.sub(r"(\d)([a-z(])", r"\1*\2", expression).replace("^", "**")
    return Fraction(eval(python, {variable: Fraction(value)}))


def numbers(match: re.Match) -> list[int]:
    return [int(group) for group in match.groups() if group is not None]


def test_algebra_roots_satisfy_their_equation():
    for example in sample("algebra"):
        equation = re.search(r"\S+(?: [-+] \S+)* = \S+(?: [-+] \S+)*", example.prompt).group().rstrip(".?")
        variable = re.search(r"[a-z]", equation).group()
        left, right = equation.split(" = ")
        assert evaluate(left, variable, example.answer) == evaluate(right, variable, example.answer), example


def derivative_at(function: str, x: int) -> Fraction:
    # The five-point stencil is exact for polynomials up to degree 4, the highest the domain uses.
    f = [evaluate(function, "x", x + step) for step in (-2, -1, 1, 2)]
    return (8 * (f[2] - f[1]) - (f[3] - f[0])) / 12


def test_analysis_derivatives_and_limits():
    for example in sample("analysis"):
        prompt, answer = example.prompt, example.answer
        if slope := (re.search(r"Let f\(x\) = (.+)\. Find f'\((-?\d+)\)\.", prompt)
                     or re.search(r"slope of f\(x\) = (.+) at x = (-?\d+)\?", prompt)):
            assert derivative_at(slope[1], int(slope[2])) == Fraction(answer), example
        elif derivative := re.search(r"(?:f\(x\) = |derivative of )(.+)[.?]$", prompt):
            assert all(derivative_at(derivative[1], x) == evaluate(answer, "x", x) for x in range(-2, 3)), example
        elif limit := (re.search(r"limit of (?P<f>.+) as x approaches (?P<at>-?\d+)\.", prompt)
                       or re.search(r"limit as x -> (?P<at>-?\d+) of (?P<f>.+)\.", prompt)):
            near = Fraction(int(limit["at"])) + Fraction(1, 10**6)
            assert abs(evaluate(limit["f"], "x", near) - Fraction(answer)) < Fraction(1, 1000), example
        else:
            at_infinity = re.search(r"limit of (.+) as x goes to infinity\.", prompt)
            assert abs(evaluate(at_infinity[1], "x", 10**9) - Fraction(answer)) < Fraction(1, 1000), example


def geometry_answer(prompt: str) -> Fraction | str:
    if legs := re.search(r"legs (?:of a right triangle are )?(\d+)(?: \w+)? and (\d+)", prompt):
        a, b = numbers(legs)
        return Fraction(math.isqrt(a * a + b * b))
    if leg := re.search(r"hypotenuse (\d+) \w+ and one leg (\d+)", prompt):
        c, a = numbers(leg)
        return Fraction(math.isqrt(c * c - a * a))
    if box := re.search(r"(\d+)(?: \w+)?(?: long,| by) (\d+)(?: \w+)?(?: wide and| by) (\d+)", prompt):
        length, width, height = numbers(box)
        if "volume" in prompt:
            return Fraction(length * width * height)
        return Fraction(2 * (length * width + length * height + width * height))
    if rectangle := re.search(r"(\d+) \w+ (?:long and|by) (\d+) \w+ (?:wide|rectangle)", prompt):
        length, width = numbers(rectangle)
        return Fraction(length * width if "area" in prompt else 2 * (length + width))
    if triangle := re.search(r"base (\d+)(?: \w+)? and height (\d+)", prompt):
        base, height = numbers(triangle)
        return Fraction(base * height, 2)
    circle = re.search(r"(radius|diameter) (\d+)", prompt)
    radius = Fraction(int(circle[2]), 2 if circle[1] == "diameter" else 1)
    multiple = radius * radius if "area" in prompt else 2 * radius
    if "Leave pi" in prompt:
        return "pi" if multiple == 1 else f"{multiple}pi"
    return multiple * Fraction("3.14")


def test_geometry_answers():
    for example in sample("geometry"):
        expected = geometry_answer(example.prompt)
        if isinstance(expected, str):
            assert example.answer == expected, example
        elif "round to one decimal place" in example.prompt:
            assert re.fullmatch(r"\d+\.\d", example.answer) and abs(Fraction(example.answer) - expected) <= 0.05
        else:
            assert Fraction(example.answer) == expected, example


def n_r(match: re.Match) -> tuple[int, int]:
    return int(match["n"]), int(match["r"])


DISCRETE_COUNTS = [
    (r"(?P<r>\d+) of (?P<n>\d+) different \w+ be arranged", lambda match: math.perm(*n_r(match))),
    (r"(?P<r>\d+)-letter codes can be made from (?P<n>\d+)", lambda match: math.perm(*n_r(match))),
    (r"(?P<n>\d+) \w+ enter a contest.* top (?P<r>\d+) places", lambda match: math.perm(*n_r(match))),
    (r"(?P<r>\d+) of (?P<n>\d+) \w+ sit in a row", lambda match: math.perm(*n_r(match))),
    (r"P\((?P<n>\d+), (?P<r>\d+)\)", lambda match: math.perm(*n_r(match))),
    (r"choose (?P<r>\d+) \w+ from (?P<n>\d+)", lambda match: math.comb(*n_r(match))),
    (r"committee of (?P<r>\d+) is chosen from (?P<n>\d+)", lambda match: math.comb(*n_r(match))),
    (r"team of (?P<r>\d+) is picked from (?P<n>\d+)", lambda match: math.comb(*n_r(match))),
    (r"(?P<r>\d+) \w+ be picked from a box of (?P<n>\d+)", lambda match: math.comb(*n_r(match))),
    (r"C\((?P<n>\d+), (?P<r>\d+)\)", lambda match: math.comb(*n_r(match))),
    (r"(?:can (\d+) \w+ be lined up|ways can (\d+) \w+ stand in a line|ways can (\d+) \w+ be placed on a shelf)",
     lambda match: math.factorial(*numbers(match))),
    (r"(?P<r>\d+)-letter strings can be made from (?P<n>\d+) letters if letters may repeat",
     lambda match: int(match["n"]) ** int(match["r"])),
    (r"(?P<r>\d+) dials with (?P<n>\d+) symbols", lambda match: int(match["n"]) ** int(match["r"])),
    (r"(?P<r>\d+) \w+ each choose one of (?P<n>\d+)", lambda match: int(match["n"]) ** int(match["r"])),
    (r"There are (?P<offers>.+)\. In how many ways can one of each",
     lambda match: math.prod(map(int, re.findall(r"\d+", match["offers"])))),
]


def test_discrete_counts_match_math_perm_and_comb():
    for example in sample("discrete"):
        matches = [(match, count) for pattern, count in DISCRETE_COUNTS
                   if (match := re.search(pattern, example.prompt))]
        assert len(matches) == 1, example
        match, count = matches[0]
        assert example.answer == str(count(match)), example


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def test_number_theory_answers():
    for example in sample("number_theory"):
        prompt, answer = example.prompt, example.answer
        if pair := re.search(r"gcd\((\d+), (\d+)\)|greatest common divisor of (\d+) and (\d+)", prompt):
            assert answer == str(math.gcd(*numbers(pair))), example
        elif pair := re.search(r"lcm\((\d+), (\d+)\)|least common multiple of (\d+) and (\d+)", prompt):
            assert answer == str(math.lcm(*numbers(pair))), example
        elif number := re.search(r"(?:Write|factorisation of|Factorise) (\d+)", prompt):
            powers = [(int(prime), int(exponent or 1)) for prime, exponent in re.findall(r"(\d+)(?:\^(\d+))?", answer)]
            assert math.prod(prime**exponent for prime, exponent in powers) == int(number[1]), example
            assert all(map(is_prime, (prime for prime, _ in powers))), example
            assert [prime for prime, _ in powers] == sorted({prime for prime, _ in powers}), example
        elif division := re.search(r"What is (\d+) mod (\d+)\?|remainder when (\d+) is divided by (\d+)", prompt):
            n, modulus = numbers(division)
            assert answer == str(n % modulus), example
        elif operation := re.search(r"Compute \((\d+ [+*] \d+)\) mod (\d+)\.", prompt):
            assert answer == str(eval(operation[1]) % int(operation[2])), example
        else:
            base, exponent, modulus = numbers(re.search(r"(\d+)\^(\d+) (?:mod|divided by) (\d+)", prompt))
            assert answer == str(pow(base, exponent, modulus)), example


def test_code_answers_are_what_the_code_returns():
    for example in sample("code"):
        *code, question = example.prompt.splitlines()
        namespace: dict = {}
        exec("\n".join(code), namespace)  # our own generated code
        call = re.search(r"\w+\([^()]*\)", question).group()
        assert str(eval(call, namespace)) == example.answer, example


ATOMIC_MASSES = {"H": 1, "Li": 7, "C": 12, "N": 14, "O": 16, "F": 19, "Na": 23, "Mg": 24, "Al": 27, "Si": 28, "P": 31,
                 "S": 32, "Cl": Fraction("35.5"), "K": 39, "Ca": 40, "Fe": 56, "Cu": Fraction("63.5"), "Br": 80}


def atoms(formula: str, times: int = 1) -> dict[str, int]:
    counts: dict[str, int] = {}
    for element, count in re.findall(r"([A-Z][a-z]?)(\d*)", formula):
        counts[element] = counts.get(element, 0) + times * int(count or 1)
    return counts


def molar_mass(formula: str) -> Fraction:
    return sum(count * Fraction(ATOMIC_MASSES[element]) for element, count in atoms(formula).items())


def side_atoms(side: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for coefficient, formula in re.findall(r"(\d*)([A-Z]\w*)", side):
        for element, count in atoms(formula, int(coefficient or 1)).items():
            totals[element] = totals.get(element, 0) + count
    return totals


def test_chemistry_answers():
    for example in generate("chemistry", 1000, seed=11):  # more than the others, to reach most reactions
        prompt, answer = example.prompt, example.answer
        if compound := re.search(r"(?:molar mass of |M\(|one mole of )(\w+)", prompt):
            assert Fraction(answer) == molar_mass(compound[1]), example
        elif amount := re.search(r"([\d.]+) mol of (\w+)", prompt):
            assert Fraction(answer) == Fraction(amount[1]) * molar_mass(amount[2]), example
        elif mass := (re.search(r"in (?P<g>[\d.]+) g of (?P<f>\w+)", prompt)
                      or re.search(r"of (?P<f>\w+) weighs (?P<g>[\d.]+) g", prompt)):
            assert Fraction(answer) == Fraction(mass["g"]) / molar_mass(mass["f"]), example
        elif share := (re.search(r"mass of (?P<f>\w+) is (?P<e>\w+)\?", prompt)
                       or re.search(r"percentage of (?P<e>\w+) in (?P<f>\w+)", prompt)):
            percent = 100 * atoms(share["f"])[share["e"]] * Fraction(ATOMIC_MASSES[share["e"]]) / molar_mass(share["f"])
            assert abs(Fraction(answer) - percent) <= 0.05, example
        else:
            left, right = answer.split(" -> ")
            assert side_atoms(left) == side_atoms(right), example
            assert math.gcd(*(int(c or 1) for c in re.findall(r"(?:^| )(\d*)[A-Z]", answer))) == 1, example
            assert re.sub(r"(^| )\d+", r"\1", answer) in prompt, example


UNIT_FACTORS = {("h", "s"): 3600, ("min", "s"): 60, ("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000,
                ("L", "mL"): 1000, ("h", "min"): 60, ("cm", "mm"): 10, ("m", "mm"): 1000, ("g", "mg"): 1000,
                ("t", "kg"): 1000, ("kJ", "J"): 1000, ("kW", "W"): 1000}


def physics_answer(prompt: str) -> Fraction:
    if motion := re.search(r"(?:moving at (\d+) m/s|starts from rest and) accelerates at (\d+) m/s\^2 for (\d+) s",
                           prompt):
        u, a, t = (int(motion[1] or 0), int(motion[2]), int(motion[3]))
        return Fraction(u + a * t) if "final speed" in prompt else u * t + Fraction(a * t * t, 2)
    if change := re.search(r"from (\d+) m/s to (\d+) m/s at (\d+) m/s\^2", prompt):
        u, v, a = numbers(change)
        return Fraction(v - u, a)
    if speed := re.search(r"(\d+) m/s(?: to|\. What is that in) km/h", prompt):
        return Fraction(int(speed[1]) * 3600, 1000)
    if speed := re.search(r"(\d+) km/h(?: to|\. What is that in) m/s", prompt):
        return Fraction(int(speed[1]) * 1000, 3600)
    if trip := re.search(r"covers ([\d.]+) km in ([\d.]+) h", prompt):
        return Fraction(trip[1]) / Fraction(trip[2])
    if down := re.search(r"Convert ([\d.]+) (\w+) to (\w+)\.", prompt):
        return Fraction(down[1]) * UNIT_FACTORS[down[2], down[3]]
    up = re.search(r"How many (\w+) is ([\d.]+) (\w+)\?", prompt)
    return Fraction(up[2]) / UNIT_FACTORS[up[1], up[3]]


def test_physics_answers():
    for example in sample("physics"):
        expected = physics_answer(example.prompt)
        if "rounded to one decimal place" in example.prompt:
            assert re.fullmatch(r"\d+\.\d", example.answer) and abs(Fraction(example.answer) - expected) <= 0.05
        else:
            assert Fraction(example.answer) == expected, example


CODONS = {
    "Phe": "UUU UUC", "Leu": "UUA UUG CUU CUC CUA CUG", "Ile": "AUU AUC AUA", "Met": "AUG", "Val": "GUU GUC GUA GUG",
    "Ser": "UCU UCC UCA UCG AGU AGC", "Pro": "CCU CCC CCA CCG", "Thr": "ACU ACC ACA ACG", "Ala": "GCU GCC GCA GCG",
    "Tyr": "UAU UAC", "His": "CAU CAC", "Gln": "CAA CAG", "Asn": "AAU AAC", "Lys": "AAA AAG", "Asp": "GAU GAC",
    "Glu": "GAA GAG", "Cys": "UGU UGC", "Trp": "UGG", "Arg": "CGU CGC CGA CGG AGA AGG", "Gly": "GGU GGC GGA GGG",
    "Stop": "UAA UAG UGA",
}
AMINO_ACID_OF = {codon: amino_acid for amino_acid, codons in CODONS.items() for codon in codons.split()}
ONE_LETTER = {"Ala": "A", "Arg": "R", "Asn": "N", "Asp": "D", "Cys": "C", "Gln": "Q", "Glu": "E", "Gly": "G",
              "His": "H", "Ile": "I", "Leu": "L", "Lys": "K", "Met": "M", "Phe": "F", "Pro": "P", "Ser": "S",
              "Thr": "T", "Trp": "W", "Tyr": "Y", "Val": "V"}


def protein(mrna: str, three_letter: bool) -> str:
    names = []
    for start in range(0, len(mrna), 3):
        amino_acid = AMINO_ACID_OF[mrna[start:start + 3]]
        if amino_acid == "Stop":
            break
        names.append(amino_acid if three_letter else ONE_LETTER[amino_acid])
    return "-".join(names) if three_letter else "".join(names)


def test_biology_transcription_and_translation():
    assert len(AMINO_ACID_OF) == 64
    for example in sample("biology"):
        prompt = example.prompt
        sequence = re.search(r"\b[ACGTU]{6,}\b", prompt).group()
        if "coding strand" in prompt:
            mrna = sequence.replace("T", "U")
        elif "template strand" in prompt:
            mrna = sequence.translate(str.maketrans("ACGT", "UGCA"))
        else:
            mrna = sequence
        expected = protein(mrna, "three-letter" in prompt) if "protein" in prompt else mrna
        assert example.answer == expected, example
