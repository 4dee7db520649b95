"""The fold methods by name, each module holding one behind the MergeMethod interface; registry.py lists every
method, fold or calibrated, with its kind."""

from pydantic import ValidationError

from merging.config import describe_validation_error
from merging.errors import ConfigError
from merging.methods.average import Average
from merging.methods.base import MergeMethod, MethodParams
from merging.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from merging.methods.dare_linear import DareLinear
from merging.methods.dare_ties import DareTies
from merging.methods.della import Della, DellaLinear
from merging.methods.model_stock import ModelStock
from merging.methods.slerp import Slerp
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties

METHODS: dict[str, type[MergeMethod]] = {
    method.name: method for method in (Average, TaskArithmetic, Ties, DareLinear, DareTies, Breadcrumbs,
                                       BreadcrumbsTies, Della, DellaLinear, ModelStock, Slerp)
}


def build_method(name: str, params: dict, seed: int = 0, source: str = "config") -> MergeMethod:
    """The named method with validated params; a ConfigError names the bad field."""
    if name not in METHODS:
        raise ConfigError(f"{source}: method: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    try:
        validated = method.Params.model_validate(params)
    except ValidationError as exc:
        line = describe_validation_error(exc, source)
        raise ConfigError(line.replace(f"{source}: ", f"{source}: params.", 1)) from exc
    return method(validated, seed)


__all__ = ["METHODS", "MergeMethod", "MethodParams", "build_method"]
