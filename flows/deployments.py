"""The deployments `mergeplan serve` runs: `on-new-expert` triggered by the event `mergeplan.expert.registered`
of the pipeline's base (parameters from the event), and the nightly `scaling-sweep` on a cron schedule.

Schedules and event triggers need a Prefect server (`mergeplan up` starts one); the ephemeral API runs neither.
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.on_new_expert import on_new_expert
from flows.pipeline_config import PipelineConfig
from flows.reconcile import reconcile
from flows.runtime import configured
from flows.scaling_sweep import scaling_sweep
from infra.settings import Settings
from infra.webhook import EVENT_NAME

NIGHTLY = "0 2 * * *"
# What the webhook receiver puts in the event (infra/webhook.py), as the flow's parameters.
EVENT_PARAMETERS = {"s3_uri": "{{ event.payload.s3_uri }}", "sha256": "{{ event.payload.sha256 }}",
                    "version": "{{ event.payload.version }}",
                    "domain": "{{ event.resource['mergeplan.domain'] }}",
                    "base": "{{ event.resource['mergeplan.base'] }}"}


def expert_trigger(base: str) -> DeploymentEventTrigger:
    return DeploymentEventTrigger(name=f"new expert of {base}", expect={EVENT_NAME},
                                  match={"prefect.resource.id": f"mergeplan.expert.{base}.*"},
                                  parameters=EVENT_PARAMETERS)


def pipeline_deployments(config: PipelineConfig, settings: Settings, cron: str = NIGHTLY) -> list[RunnerDeployment]:
    """One deployment per flow, named after the base; the pipeline config is each one's default parameter.

    One run at a time of each (the others wait): two experts registered together are added one after the other,
    the second to the champion the first left, not both to the same one."""
    parameters = {"config": config.as_parameters()}
    new_expert = configured(on_new_expert, config.runner, settings).to_deployment(
        name=config.base.name, parameters=parameters, triggers=[expert_trigger(config.base.name)], concurrency_limit=1,
        description=f"Merge each new expert of {config.base.name} into the champion")
    sweep = configured(scaling_sweep, config.runner, settings).to_deployment(
        name=config.base.name, parameters=parameters, cron=cron, concurrency_limit=1,
        description=f"Sweep subsets of {config.base.name}'s experts and refit the law")
    return [new_expert, sweep]


def serve_pipeline(config: PipelineConfig, settings: Settings, cron: str = NIGHTLY, reconcile_first: bool = True
                   ) -> None:
    """Run the deployments in this process until interrupted (each flow run in a subprocess); first, unless told
    otherwise, merge the registered experts whose events no run took while nothing was serving (flows.reconcile)."""
    if reconcile_first:
        configured(reconcile, config.runner, settings)(config)
    serve(*pipeline_deployments(config, settings, cron), print_starting_message=True)
