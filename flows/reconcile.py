"""`reconcile`: the registered experts that no run has taken yet, each run through on-new-expert, oldest
registration first.

A registration whose event never reached a flow run (Prefect was down when the webhook fired, the receiver was
stopped, a trigger was paused) is otherwise lost: MLflow has the version, no run merged it. An expert version
counts as taken when a finished on-new-expert run names it (S3 folder and manifest sha256) or the champion holds
it. `mergeplan reconcile` runs this, and so does `mergeplan serve` before it starts serving.
"""

from __future__ import annotations

import logging

from prefect import flow

from flows.merge_pipeline import recording_settings
from flows.on_new_expert import champion_experts, on_new_expert
from flows.outcome import Outcome
from flows.pipeline_config import PipelineConfig
from infra.settings import Settings
from merging.errors import ExpertRefused
from tasks.registry import RegisteredExpert, champion_version, latest_expert_versions
from tasks.tracking import experts_taken

FLOW_NAME = "reconcile"
log = logging.getLogger("mergeplan")


def untaken_experts(config: PipelineConfig, settings: Settings) -> list[RegisteredExpert]:
    """The newest version of each registered expert of the pipeline's base that no run took, oldest first."""
    taken = experts_taken(config.experiment_name, settings)
    champion = champion_version(config.base.name, settings=settings)
    if champion is not None:
        taken |= {(ref.uri, ref.sha256) for ref in champion_experts(champion)}
    return [expert for expert, _ in latest_expert_versions(config.base.name, settings=settings)
            if (expert.s3_uri, expert.sha256) not in taken]


@flow(name=FLOW_NAME)
def reconcile(config: PipelineConfig) -> list[Outcome]:
    """The outcome of each untaken expert's on-new-expert run; a refused expert (another base) is logged and
    skipped, as its run is tagged refused and will not be taken again."""
    settings = recording_settings()
    outcomes = []
    for expert in untaken_experts(config, settings):
        try:
            outcomes.append(on_new_expert(config, expert.s3_uri, expert.sha256, expert.version, expert.domain,
                                          expert.base))
        except ExpertRefused as exc:  # an outage is not caught: the run fails, and the next reconcile retries
            log.warning("%s version %s not merged: %s", expert.model_name, expert.version, exc)
    return outcomes
