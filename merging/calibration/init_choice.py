"""`init: auto`: ᾱ, where every coefficient starts and the pull aims, is the Task Arithmetic coefficient in the
paper, and it matters: on LoRA experts that interfere strongly (SmolLM2's nine) the bench's tuned λ was 0.1, and
Expert Merging from 0.3 (1 epoch) reached 0.997 held-out macro CE where from 0.1 (2 epochs) it reached 0.890. So it
is chosen per merge as the bench chose it: for each λ of the grid, every coefficient at λ, and the merge with the
lowest next-token CE on the samples `gamma: auto` holds out wins (all of them when none can be held out). Nothing is
trained: one forward pass over those samples per λ, a quarter of an epoch's forward passes each."""

from __future__ import annotations

import logging
from collections.abc import Callable

from merging.calibration.gamma_choice import held_out_split
from merging.calibration.params import CalibrationParams
from merging.calibration.samples import Sample

log = logging.getLogger("mergeplan")

FALLBACK_INIT = 0.3  # the Task Arithmetic default, when no whole model can be scored


def choose_init(params: CalibrationParams, samples: list[Sample], unsupported: str | None,
                score: Callable[[float, list[Sample]], float]) -> tuple[CalibrationParams, dict | None]:
    """PARAMS with init fixed, and the choice's record for calibration.json (None when init was given).

    SCORE(λ, samples) -> CE of the merge with every coefficient at λ; UNSUPPORTED names why scoring is impossible
    here (blockwise mode has no whole model), or is None."""
    if params.init != "auto":
        return params, None
    if unsupported is not None:  # a warning when asked for; the default's fallback is only noted
        report = log.warning if "init" in params.model_fields_set else log.info
        report("init: auto: %s; using ᾱ = %g", unsupported, FALLBACK_INIT)
        return params.model_copy(update={"init": FALLBACK_INIT}), {
            "chosen": FALLBACK_INIT, "fallback": unsupported, "ce": {}}
    held = held_out_split(samples, params.holdout)[1] or samples
    scores = {value: score(value, held) for value in params.init_grid}
    chosen = min(params.init_grid, key=lambda value: scores[value])  # ties: the first in the grid
    log.info("init: auto chose ᾱ = %g (CE %s on %d calibration samples)", chosen,
             ", ".join(f"{value:g}: {ce:.4f}" for value, ce in scores.items()), len(held))
    return params.model_copy(update={"init": chosen}), {
        "chosen": chosen, "ce": {str(value): round(ce, 6) for value, ce in scores.items()}, "samples": len(held)}
