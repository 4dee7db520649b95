"""`reconcile`: the registered experts that no run has taken yet, each run through on-new-expert, oldest
registration first.

A registration whose event never reached a flow run (Prefect was down when the webhook fired, the receiver was
stopped, a trigger was paused) is otherwise lost: MLflow has the version, no run merged it. An expert version
counts as taken when a finished on-new-expert run names it (S3 folder and manifest sha256) or the head holds
it. `mergeplan reconcile` runs this, and so does `mergeplan serve` before it starts serving.
"""

from __future__ import annotations

from prefect import flow

from flows.conclusion import Outcome
from flows.inputs import recording_settings
from flows.on_new_expert import add_untaken
from flows.pipeline_config import PipelineConfig
from tasks.pipeline_state import untaken_experts

FLOW_NAME = "reconcile"


@flow(name=FLOW_NAME)
def reconcile(config: PipelineConfig) -> list[Outcome]:
    """The outcome of each untaken expert's on-new-expert run, oldest registration first; a refused expert
    (another base) is logged and skipped."""
    settings = recording_settings()
    return add_untaken(config, untaken_experts(config.experiment_name, config.base.name, settings), settings)
