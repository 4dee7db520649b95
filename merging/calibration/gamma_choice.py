"""`gamma: auto`: the pull towards init is the knob that decides whether calibration beats the training-free
methods (on SmolLM2, Expert Merging++ won at γ 0 and lost at the paper's 0.8), so it is chosen per merge, as the
benchmark chose it: each γ of the grid is trained on most of the calibration samples, and the one whose merge has
the lowest next-token CE on the samples held out wins; the final coefficients are then trained on all of them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from merging.calibration.params import CalibrationParams
from merging.calibration.samples import Sample

log = logging.getLogger("mergeplan")

FALLBACK_GAMMA = 0.8  # the paper's, when nothing can be held out


def held_out_split(samples: list[Sample], share: float) -> tuple[list[Sample], list[Sample]]:
    """(trained on, held out): of each expert's samples (drawn at random, seeded), the last ⌈share · n⌉ are held
    out, leaving at least one to train on; an expert with a single sample keeps it for training."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.expert, []).append(sample)
    trained, held = [], []
    for group in groups.values():
        kept = len(group) - min(len(group) - 1, math.ceil(share * len(group))) if len(group) > 1 else 1
        trained += group[:kept]
        held += group[kept:]
    return trained, held


def choose_gamma(params: CalibrationParams, samples: list[Sample], supported: str | None,
                 train: Callable[[list[Sample], CalibrationParams], object],
                 score: Callable[[object, list[Sample]], float]) -> tuple[CalibrationParams, dict | None]:
    """PARAMS with γ fixed, and the choice's record for calibration.json (None when γ was given).

    TRAIN(samples, params) -> coefficients; SCORE(coefficients, samples) -> the merge's CE on them. SUPPORTED
    names why scoring is impossible here (e.g. blockwise mode has no whole model), or is None."""
    if params.gamma != "auto":
        return params, None
    trained_on, held = held_out_split(samples, params.holdout)
    reason = supported or (None if held else "no expert has two calibration samples to hold one out")
    if reason is not None:
        log.warning("gamma: auto: %s; using the paper's γ = %g", reason, FALLBACK_GAMMA)
        return params.model_copy(update={"gamma": FALLBACK_GAMMA}), {
            "chosen": FALLBACK_GAMMA, "fallback": reason, "held_out_ce": {}}
    scores = {}
    for gamma in params.gamma_grid:
        candidate = params.model_copy(update={"gamma": gamma, "keep_epochs": []})
        scores[gamma] = score(train(trained_on, candidate), held)
        log.info("gamma: auto: γ = %g -> held-out CE %.4f", gamma, scores[gamma])
    chosen = min(params.gamma_grid, key=lambda gamma: scores[gamma])  # ties: the first in the grid
    log.info("gamma: auto chose γ = %g (held-out CE %.4f on %d samples)", chosen, scores[chosen], len(held))
    return params.model_copy(update={"gamma": chosen}), {
        "chosen": chosen, "held_out_ce": {str(g): round(ce, 6) for g, ce in scores.items()},
        "held_out_samples": len(held), "trained_on_samples": len(trained_on)}
