"""The pipeline's deployments: `on-new-expert` triggered by the event `mergeplan.expert.registered` of the pipeline's
base (parameters from the event), and the nightly `scaling-sweep` on a cron schedule; `mergeplan serve` runs them in
its own process, `mergeplan deploy` registers them to a Prefect process work pool whose workers run them.

Schedules and event triggers need a Prefect server (`mergeplan up` starts one); the ephemeral API runs neither.

A flow-run process (of `serve` or of a worker) imports its deployment's entrypoint, a module path; the flows it names
here (WORKER_ENTRYPOINTS) are configured there (flows.runtime.configured): the task runner named by RUNNER_ENV (the
deployment's one job variable on a pool; set by `serve` in its own environment), results under the state folder of
that process's settings. (Loaded from its file instead, a served flow would persist its results in Prefect's default
storage, ~/.prefect/storage, shared by every state folder on the machine.) Everything else the flow-run process needs (MERGEPLAN_*, the credentials) it
inherits from the worker's environment: no secret is stored in the deployment. docs/production-workers.md.

A run whose process dies with its machine stays Running in Prefect: `deploy` adds two automations that find it by
its missing heartbeats, mark it Crashed (freeing the deployment's one slot), and reschedule it for any worker of the
pool, a bounded number of times.
"""

from __future__ import annotations

import os
from datetime import timedelta
from uuid import UUID

from prefect import Flow, serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.types.entrypoint import EntrypointType
from prefect.types.names import BANNED_CHARACTERS

from flows.on_new_expert import on_new_expert
from flows.pipeline_config import PipelineConfig, RunnerSettings
from flows.reconcile import reconcile
from flows.runtime import configured
from flows.scaling_sweep import scaling_sweep
from infra.settings import Settings
from infra.webhook import EVENT_NAME
from merging.errors import ConfigError

NIGHTLY = "0 2 * * *"
DEFAULT_POOL = "mergeplan"
POOL_TYPE = "process"
# What the webhook receiver puts in the event (infra/webhook.py), as the flow's parameters.
EVENT_PARAMETERS = {"s3_uri": "{{ event.payload.s3_uri }}", "sha256": "{{ event.payload.sha256 }}",
                    "version": "{{ event.payload.version }}",
                    "domain": "{{ event.resource['mergeplan.domain'] }}",
                    "base": "{{ event.resource['mergeplan.base'] }}"}
# The deployment's task runner (RunnerSettings as JSON), set in its job variables for the worker's flow-run process.
RUNNER_ENV = "MERGEPLAN_DEPLOYED_RUNNER"
WORKER_ENTRYPOINTS = {"on_new_expert_in_worker": on_new_expert, "scaling_sweep_in_worker": scaling_sweep}
# A flow run's process sends a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect's default 180,
# at least 30); a run silent for longer than this after one is taken for dead with its machine.
UNRESPONSIVE_AFTER_S = 600
RETRIES = 2  # reschedulings of a crashed run: a run that crashes every time (killed for memory) stays Crashed
# After a run starts or sends a heartbeat, any event of it (a heartbeat, a state change) says it is alive.
ALIVE_AFTER = {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}


def __getattr__(name: str) -> Flow:
    """The worker entrypoints (`flows.deployments.on_new_expert_in_worker`, ...): built when a worker's flow-run
    process imports one, from its environment, so that importing this module elsewhere reads no settings."""
    if name not in WORKER_ENTRYPOINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    runner = RunnerSettings.model_validate_json(os.environ.get(RUNNER_ENV) or "{}")
    return configured(WORKER_ENTRYPOINTS[name], runner, Settings.from_env())


def worker_entrypoint(flow: Flow) -> str:
    """The module path a worker's flow-run process imports FLOW from, configured (see __getattr__)."""
    return next(f"{__name__}.{name}" for name, known in WORKER_ENTRYPOINTS.items() if known is flow)


def expert_trigger(base: str) -> DeploymentEventTrigger:
    return DeploymentEventTrigger(name=f"new expert of {base}", expect={EVENT_NAME},
                                  match={"prefect.resource.id": f"mergeplan.expert.{base}.*"},
                                  parameters=EVENT_PARAMETERS)


def pipeline_deployments(config: PipelineConfig, settings: Settings, cron: str = NIGHTLY, pool: str | None = None
                         ) -> list[RunnerDeployment]:
    """One deployment per flow, named after the base; the pipeline config is each one's default parameter. With
    POOL, each is registered to that work pool, for its workers to import and run.

    One run at a time of each (the others wait): two experts registered together are added one after the other,
    the second to the champion the first left, not both to the same one."""
    parameters = {"config": config.as_parameters()}
    # Served or pooled, a flow run's process imports the flow by module path, configured there from its environment
    # (task runner, result storage under the state folder): the flow's own file would give Prefect's default storage.
    placement = {"entrypoint_type": EntrypointType.MODULE_PATH} if pool is None else {
        "work_pool_name": pool, "entrypoint_type": EntrypointType.MODULE_PATH,
        "job_variables": {"env": {RUNNER_ENV: config.runner.model_dump_json()}}}
    new_expert = configured(on_new_expert, config.runner, settings).to_deployment(
        name=config.base.name, parameters=parameters, triggers=[expert_trigger(config.base.name)], concurrency_limit=1,
        description=f"Merge each new expert of {config.base.name} into the champion", **placement)
    sweep = configured(scaling_sweep, config.runner, settings).to_deployment(
        name=config.base.name, parameters=parameters, cron=cron, concurrency_limit=1,
        description=f"Sweep subsets of {config.base.name}'s experts and refit the law", **placement)
    new_expert.entrypoint, sweep.entrypoint = worker_entrypoint(on_new_expert), worker_entrypoint(scaling_sweep)
    return [new_expert, sweep]


def serve_pipeline(config: PipelineConfig, settings: Settings, cron: str = NIGHTLY, reconcile_first: bool = True
                   ) -> None:
    """Run the deployments in this process until interrupted (each flow run in a subprocess); first, unless told
    otherwise, merge the registered experts whose events no run took while nothing was serving (flows.reconcile)."""
    if reconcile_first:
        configured(reconcile, config.runner, settings)(config)
    os.environ[RUNNER_ENV] = config.runner.model_dump_json()  # the flow-run processes inherit it (a worker's: above)
    serve(*pipeline_deployments(config, settings, cron), print_starting_message=True)


def ensure_process_pool(name: str) -> bool:
    """Create the process work pool NAME unless it exists; whether it was created. A pool of another type is
    refused: its workers would not run these deployments as subprocesses of a worker."""
    from prefect.workers.process import ProcessWorker

    if not name.strip() or any(character in name for character in BANNED_CHARACTERS):
        raise ConfigError(f"work pool {name!r}: a name needs a character other than spaces and none of "
                          f"{' '.join(BANNED_CHARACTERS)}")
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
    if pool.type != POOL_TYPE:
        raise ConfigError(f"work pool {name!r} is of type {pool.type!r}; the deployments need a {POOL_TYPE!r} pool: "
                          "name another one (a pool that does not exist is created)")
    return False


def _of_deployments(deployment_ids: list[UUID]) -> dict[str, str | list[str]]:
    """Events whose related resources include one of these deployments (a flow run's events name its deployment)."""
    return {"prefect.resource.role": "deployment",
            "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids]}


def fault_automations(base: str, deployment_ids: list[UUID], unresponsive_after_s: float = UNRESPONSIVE_AFTER_S,
                      retries: int = RETRIES) -> list[AutomationCore]:
    """Prefect's own server leaves a run whose process died with its machine Running (its deployment's slot held
    until the slot's lease expires); these two make it Crashed, then Scheduled again for any worker, at most RETRIES
    times (the run count of a crashed run is how many times it started)."""
    runs = {"prefect.resource.id": "prefect.flow-run.*"}
    unresponsive = AutomationCore(
        name=f"mergeplan {base}: crash unresponsive runs",
        description=f"A run of {base}'s deployments without a heartbeat for {unresponsive_after_s:g} s died with its "
                    "worker: Crashed",
        trigger=EventTrigger(after=ALIVE_AFTER, expect={"prefect.flow-run.*"}, match=runs,
                             match_related=_of_deployments(deployment_ids), for_each={"prefect.resource.id"},
                             posture=Posture.Proactive, threshold=1, within=timedelta(seconds=unresponsive_after_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {unresponsive_after_s:g} s: its worker died")])
    rerun = AutomationCore(
        name=f"mergeplan {base}: reschedule crashed runs",
        description=f"A crashed run of {base}'s deployments runs again on any worker, at most {retries} times",
        trigger=EventTrigger(expect={"prefect.flow-run.Crashed"},
                             match=runs | {"prefect.run-count": [str(n) for n in range(retries + 1)]},
                             match_related=_of_deployments(deployment_ids), posture=Posture.Reactive, threshold=1,
                             within=timedelta(0)),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry",
                                    message="rescheduled after a crash: any worker of the pool takes it")])
    return [unresponsive, rerun]


def apply_automation(automation: AutomationCore) -> None:
    """Create AUTOMATION, or replace the one of the same name (a second deploy updates, never duplicates)."""
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        if existing:
            client.update_automation(existing[0].id, automation)
        else:
            client.create_automation(automation)


def deploy_pipeline(config: PipelineConfig, settings: Settings, pool: str = DEFAULT_POOL, cron: str = NIGHTLY,
                    unresponsive_after_s: float = UNRESPONSIVE_AFTER_S, retries: int = RETRIES) -> list[str]:
    """Register the deployments to the process work pool POOL (created when missing) with the automations that
    recover their crashed runs; the names of the deployments (FLOW/BASE)."""
    ensure_process_pool(pool)
    deployments = pipeline_deployments(config, settings, cron, pool)
    ids = [deployment.apply(work_pool_name=pool) for deployment in deployments]
    for automation in fault_automations(config.base.name, ids, unresponsive_after_s, retries):
        apply_automation(automation)
    return [f"{deployment.flow_name}/{deployment.name}" for deployment in deployments]
