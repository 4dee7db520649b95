"""The one registry of merge methods: every name with its kind and a one-line summary.

A "fold" method merges in one streamed pass over the experts' task vectors (merging.methods builds it); a "group"
method reads every input's tensor at once (no incremental merge, no sweep); "stack" copies layer ranges of models
one after another (merging.stacking); a "calibrated" method learns its coefficients on unlabeled samples first
(merging.calibration runs it). The calibration package sits above this one, so its methods are listed here as
data and it asks this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MethodKind = Literal["fold", "group", "stack", "calibrated"]


@dataclass(frozen=True)
class RegisteredMethod:
    name: str
    kind: MethodKind
    summary: str


REGISTRY: tuple[RegisteredMethod, ...] = (
    RegisteredMethod("average", "fold", "the weighted mean of the experts"),
    RegisteredMethod("task_arithmetic", "fold", "θ0 + λ Σ wi τi, optionally divided by Σ wi (Ilharco et al. 2023)"),
    RegisteredMethod("ties", "fold", "magnitude trim, sign election, disjoint mean (Yadav et al. 2023)"),
    RegisteredMethod("dare_linear", "fold", "DARE drop-and-rescale of each task vector, then task arithmetic"),
    RegisteredMethod("dare_ties", "fold", "DARE drop-and-rescale, then the TIES sign election and disjoint mean"),
    RegisteredMethod("breadcrumbs", "fold", "drop each task vector's outliers and smallest entries, then task "
                     "arithmetic"),
    RegisteredMethod("breadcrumbs_ties", "fold", "breadcrumbs, then the TIES sign election and disjoint mean"),
    RegisteredMethod("della", "fold", "MagPrune drop-and-rescale (DELLA), then the TIES sign election and disjoint "
                     "mean"),
    RegisteredMethod("della_linear", "fold", "MagPrune drop-and-rescale (DELLA), then task arithmetic"),
    RegisteredMethod("model_stock", "fold", "θ0 + t·mean(τi), t from the task vectors' mean cosine (2+ experts)"),
    RegisteredMethod("slerp", "fold", "spherical interpolation from the base to its one expert"),
    RegisteredMethod("nuslerp", "group", "spherical interpolation of two models, or of two task vectors from the "
                     "base"),
    RegisteredMethod("multislerp", "group", "spherical weighted mean of several models or task vectors (one "
                     "tangent step on the sphere)"),
    RegisteredMethod("karcher", "group", "the Riemannian (Karcher) mean of the models' directions, times their mean "
                     "norm"),
    RegisteredMethod("sce", "group", "keep the entries of most variance across experts, weight by energy, elect "
                     "signs (SCE)"),
    RegisteredMethod("ram", "group", "Reinforced Agent Merging: entries shared by several experts are averaged, "
                     "unique ones kept"),
    RegisteredMethod("ramplus_tl", "group", "RAM+ (tensor-local): RAM with unique entries rescaled by the tensor's "
                     "overlap"),
    RegisteredMethod("nearswap", "group", "the expert's entries within t of the base; farther ones moved t towards "
                     "the expert"),
    RegisteredMethod("arcee_fusion", "group", "the expert's entries whose KL-weighted change is an outlier "
                     "(quartile threshold)"),
    RegisteredMethod("passthrough", "stack", "layer ranges of models stacked in order (a frankenmerge), each "
                     "copied, optionally scaled"),
    RegisteredMethod("expert_merging", "calibrated", "coefficients that align the merged model with each expert on "
                     "its samples"),
    RegisteredMethod("expert_merging_pp", "calibrated", "Expert Merging with chunk-wise coefficients allocated by "
                     "importance"),
    RegisteredMethod("adamerging", "calibrated", "layer-wise coefficients minimising the merged model's entropy on "
                     "the samples"),
)
_KINDS: dict[str, MethodKind] = {method.name: method.kind for method in REGISTRY}


def methods_of_kind(kind: MethodKind) -> tuple[str, ...]:
    """The names of KIND's methods, in registry order."""
    return tuple(method.name for method in REGISTRY if method.kind == kind)


def is_calibrated(name: str) -> bool:
    """Whether NAME is a registered calibrated method (an unknown name is not)."""
    return _KINDS.get(name) == "calibrated"
