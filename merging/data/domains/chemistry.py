"""Chemistry: molar masses from a small periodic table, moles and grams, mass percentages, balancing."""

from __future__ import annotations

import math
import random
import re
from decimal import Decimal
from fractions import Fraction

from merging.data.domains._working import (
    Template,
    approx_text,
    chain,
    decimal_text,
    round_one_place,
    signed_term,
    worked_example,
)
from merging.data.example import Example

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
    masses = {element: decimal_text(_ATOMIC_MASSES[element]) for element in counts}
    terms = [masses[element] if count == 1 else f"{count} * {masses[element]}" for element, count in counts.items()]
    return total, f"M({formula}) = {chain(' + '.join(terms), decimal_text(total))} g/mol"


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
    steps += [f"{element}: {counts[element]} * {decimal_text(_ATOMIC_MASSES[element])} = {decimal_text(part)}"
              for element, part in parts.items()]
    total = sum(parts.values(), Decimal(0))
    addition = " + ".join(decimal_text(part) for part in parts.values())
    steps.append(f"M = {chain(addition, decimal_text(total))} g/mol")
    return worked_example(prompt, steps, decimal_text(total))


def _chemistry_mass_from_moles(rng: random.Random) -> Example:
    formula, moles = rng.choice(_COMPOUNDS), rng.choice(_MOLE_AMOUNTS)
    molar_mass, working = _molar_mass(formula)
    mass = decimal_text(moles * molar_mass)
    prompt = rng.choice((f"What is the mass of {moles} mol of {formula} in grams?",
                         f"How many grams do {moles} mol of {formula} weigh?"))
    steps = [working, f"m = n * M = {moles} * {decimal_text(molar_mass)} = {mass} g"]
    return worked_example(prompt, steps, mass)


def _chemistry_moles_from_mass(rng: random.Random) -> Example:
    formula, moles = rng.choice(_COMPOUNDS), rng.choice(_MOLE_AMOUNTS)
    molar_mass, working = _molar_mass(formula)
    mass = decimal_text(moles * molar_mass)
    prompt = rng.choice((f"How many moles are in {mass} g of {formula}?",
                         f"A sample of {formula} weighs {mass} g. How many moles is that?"))
    steps = [working, f"n = m / M = {mass} / {decimal_text(molar_mass)} = {moles} mol"]
    return worked_example(prompt, steps, moles)


def _chemistry_mass_percent(rng: random.Random) -> Example:
    formula = rng.choice(_MIXED_COMPOUNDS)
    element, count = rng.choice(list(_element_counts(formula).items()))
    molar_mass, working = _molar_mass(formula)
    part = count * _ATOMIC_MASSES[element]
    percent = part * 100 / molar_mass
    prompt = rng.choice((f"What percentage of the mass of {formula} is {element}? Round to one decimal place.",
                         f"Find the mass percentage of {element} in {formula}, to one decimal place."))
    steps = [working, f"{element}: {count} * {decimal_text(_ATOMIC_MASSES[element])} = {decimal_text(part)}",
             f"{decimal_text(part)} / {decimal_text(molar_mass)} * 100 = {approx_text(percent)}",
             f"Rounded to one decimal place: {round_one_place(percent)}"]
    return worked_example(prompt, steps, round_one_place(percent))


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
             f"O: {2 * carbon} + {water}{signed_term(-fuel_oxygen)} = {oxygen_atoms} atoms from O2, "
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
    return worked_example(prompt, steps, _equation_text(reaction))


TEMPLATES: tuple[Template, ...] = (_chemistry_molar_mass, _chemistry_mass_from_moles, _chemistry_moles_from_mass,
                                  _chemistry_mass_percent, _chemistry_balance)
