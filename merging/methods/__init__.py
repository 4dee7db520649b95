"""The merge methods by name, each module holding one: the folds behind the MergeMethod interface, the methods
that need every input at once behind GroupMethod; registry.py lists every method, with its kind."""

from pydantic import ValidationError

from merging.config import describe_validation_error
from merging.errors import ConfigError
from merging.methods.arcee_fusion import ArceeFusion
from merging.methods.average import Average
from merging.methods.base import MergeMethod, MethodParams
from merging.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from merging.methods.dare_linear import DareLinear
from merging.methods.dare_ties import DareTies
from merging.methods.della import Della, DellaLinear
from merging.methods.group import GroupMethod
from merging.methods.karcher import Karcher
from merging.methods.model_stock import ModelStock
from merging.methods.multislerp import Multislerp
from merging.methods.nearswap import Nearswap
from merging.methods.nuslerp import Nuslerp
from merging.methods.ram import Ram, RamPlusTl
from merging.methods.sce import Sce
from merging.methods.slerp import Slerp
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties

METHODS: dict[str, type[MergeMethod]] = {
    method.name: method for method in (Average, TaskArithmetic, Ties, DareLinear, DareTies, Breadcrumbs,
                                       BreadcrumbsTies, Della, DellaLinear, ModelStock, Slerp)
}


GROUP_METHODS: dict[str, type[GroupMethod]] = {
    method.name: method for method in (Nuslerp, Multislerp, Karcher, Sce, Ram, RamPlusTl, Nearswap, ArceeFusion)
}
# mergekit's parameter names of each method that is not a fold (with_base is set by the mergekit reader)
GROUP_PARAMETERS: dict[str, set[str]] = {
    name: {field.alias or key for key, field in method.Params.model_fields.items() if key != "with_base"}
    | ({"weight"} if method.takes_weights else set()) for name, method in GROUP_METHODS.items()
}


def method_class(name: str, source: str = "config") -> type[MergeMethod | GroupMethod]:
    if name not in METHODS and name not in GROUP_METHODS:
        raise ConfigError(f"{source}: method: unknown method {name!r}; choose one of "
                          f"{', '.join([*METHODS, *GROUP_METHODS])}")
    return METHODS.get(name) or GROUP_METHODS[name]


def build_method(name: str, params: dict, seed: int = 0, source: str = "config") -> MergeMethod | GroupMethod:
    """The named method with validated params; a ConfigError names the bad field."""
    method = method_class(name, source)
    try:
        validated = method.Params.model_validate(params)
    except ValidationError as exc:
        line = describe_validation_error(exc, source)
        raise ConfigError(line.replace(f"{source}: ", f"{source}: params.", 1)) from exc
    return method(validated, seed)


__all__ = ["GROUP_METHODS", "GROUP_PARAMETERS", "METHODS", "GroupMethod", "MergeMethod", "MethodParams", "build_method",
           "method_class"]
