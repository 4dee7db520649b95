"""breadcrumbs: Model Breadcrumbs (Davari & Belilovsky, 2023): each task vector loses its largest outliers
(`gamma`) and its smallest entries (keeping `density`), then task arithmetic; breadcrumbs_ties adds the TIES
sign election and disjoint mean."""

import torch
from pydantic import Field

from merging.methods.base import DensityParams, DisjointParams, LinearParams
from merging.methods.sparsify import outlier_trim_
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties


class OutlierParams(DensityParams):
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of each task vector's largest entries removed")


class BreadcrumbsParams(OutlierParams, LinearParams):
    pass


class BreadcrumbsTiesParams(OutlierParams, DisjointParams):
    pass


class Breadcrumbs(TaskArithmetic):
    name = "breadcrumbs"
    Params = BreadcrumbsParams
    allows_negative_weights = False

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return outlier_trim_(delta, self.params.density, self.params.gamma, self.params.rescale)


class BreadcrumbsTies(Ties):
    name = "breadcrumbs_ties"
    Params = BreadcrumbsTiesParams

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return outlier_trim_(delta, self.params.density, self.params.gamma, self.params.rescale)
