"""Biology: DNA to mRNA to protein with the standard genetic code, stopping at the first stop codon."""

from __future__ import annotations

import random

from merging.data.domains._working import Template, worked_example
from merging.data.example import Example

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
    return worked_example(prompt, [f"mRNA is the coding strand with T -> U: {mrna}", *steps], protein)


def _biology_template_strand(rng: random.Random) -> Example:
    mrna = _random_gene(rng)
    three_letter, style = _code_style(rng)
    prompt = (f"The template strand (3' to 5') of a gene is {mrna.translate(_MRNA_TO_TEMPLATE)}. "
              f"Give its protein in {style} codes.")
    steps, protein = _translation(mrna, three_letter)
    return worked_example(prompt, [f"mRNA pairs with the template (A-U, T-A, G-C, C-G): {mrna}", *steps], protein)


def _biology_mrna(rng: random.Random) -> Example:
    mrna = _random_gene(rng)
    three_letter, style = _code_style(rng)
    prompt = rng.choice((f"Translate the mRNA {mrna} into protein ({style} codes).",
                         f"Which protein does the mRNA {mrna} encode? Use {style} codes."))
    steps, protein = _translation(mrna, three_letter)
    return worked_example(prompt, ["Read from the start codon AUG in groups of three:", *steps], protein)


def _biology_transcription(rng: random.Random) -> Example:
    template = "".join(rng.choice("ACGT") for _ in range(rng.randint(9, 18)))
    mrna = template.translate(_TEMPLATE_TO_MRNA)
    prompt = rng.choice((f"Transcribe the DNA template strand {template} into mRNA.",
                         f"Which mRNA is made from the DNA template strand {template}?"))
    # Groups of three are easier to pair up, for a reader and for a small model, than one long run of bases.
    steps = ["Pair each base: A->U, T->A, G->C, C->G", f"{' '.join(_codons(template))} -> {' '.join(_codons(mrna))}"]
    return worked_example(prompt, steps, mrna)


TEMPLATES: tuple[Template, ...] = (_biology_coding_strand, _biology_template_strand, _biology_mrna,
                                  _biology_transcription)
