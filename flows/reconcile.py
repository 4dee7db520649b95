"""`reconcile`: the registered experts that no run has taken yet, each run through on-new-expert, oldest
registration first.

A registration whose event never reached a flow run (Prefect was down when the webhook fired, the receiver was
stopped, a trigger was paused) is otherwise lost: MLflow has the version, no run merged it. An expert version
counts as taken when a finished on-new-expert run names it (S3 folder and manifest sha256) or the head holds
it. `mergeplan reconcile` runs this, and so does `mergeplan serve` before it starts serving. With workers
(`mergeplan deploy`), `reconcile_through_pool` hands them the same work instead: one run of the on-new-expert
deployment, which drains every untaken expert under the deployment's one slot.
"""

from __future__ import annotations

from prefect import flow
from prefect.client.schemas.objects import FlowRun

from flows.conclusion import Outcome
from flows.inputs import recording_settings
from flows.on_new_expert import FLOW_NAME as ON_NEW_EXPERT
from flows.on_new_expert import add_untaken
from flows.pipeline_config import PipelineConfig
from infra.settings import Settings
from tasks.pipeline_state import untaken_experts

FLOW_NAME = "reconcile"


@flow(name=FLOW_NAME)
def reconcile(config: PipelineConfig) -> list[Outcome]:
    """The outcome of each untaken expert's on-new-expert run, oldest registration first; a refused expert
    (another base) is logged and skipped."""
    settings = recording_settings()
    return add_untaken(config, untaken_experts(config.experiment_name, config.base.name, settings), settings)


def reconcile_through_pool(config: PipelineConfig, settings: Settings) -> FlowRun | None:
    """A run of the deployed on-new-expert for the oldest untaken expert, for a worker to take: it adds the others
    after it (a triggered run drains), so nothing merges beside a triggered run. None when every expert is taken."""
    from prefect.deployments import run_deployment

    untaken = untaken_experts(config.experiment_name, config.base.name, settings)
    if not untaken:
        return None
    oldest = untaken[0]
    return run_deployment(f"{ON_NEW_EXPERT}/{config.base.name}", timeout=0, as_subflow=False,
                          parameters={"s3_uri": oldest.s3_uri, "sha256": oldest.sha256, "version": oldest.version,
                                      "domain": oldest.domain, "base": oldest.base})
