"""`on-new-expert`: a newly registered expert joins the head (the merge of every expert taken so far)
incrementally, is evaluated, the law refitted with the new point, and the decision (continue / stop) logged; the
result is registered as the new head, and becomes the champion when its macro CE is lower.

Registration order and exactly once: a run takes, oldest first, every registered expert that no run has taken,
its own among them (a burst of events can start runs in any order; the first one drains the burst), and does
nothing for an expert an earlier run already took (an event delivered twice, or drained by such a run).

Incremental means: the head's accumulators (kept under STATE_DIR/work/merges/KEY/state by the run that made
it) plus the new expert, read alone; the result equals a full merge of all of them. A full merge is run instead
when there is no head yet, the expert replaces one of the head's domains, the method or its params changed, or
the accumulators are not on this machine. An expert of another base is refused with the reason.

Calibrated methods keep no accumulators: the new expert joins a calibrated head warm when it is a new domain and
the head was calibrated with the same method, params and seed (its training budget aside): calibration starts
from the head's coefficients (its work folder here, else its coefficients.json in the store), the new expert at
params.init, for `warm_start.epochs`. Otherwise, or with `warm_start: false`, it calibrates every expert cold. The
run's tags say which and why (CALIBRATION_START_TAG, CALIBRATION_REASON_TAG).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from prefect import flow

from flows.conclusion import Outcome, conclude
from flows.inputs import fetch_data, fetch_many, fetch_one, merge_job, pipeline_base, recording_settings, run_tags
from flows.pipeline_config import PipelineConfig
from infra.errors import ExpertRefused
from infra.registry import MERGE_KEY, RegisteredExpert, check_same_base, head_version
from infra.settings import Settings
from merging.calibration import params_for
from merging.methods.registry import is_calibrated
from tasks.caching import content_hash, fresh
from tasks.fetch import CheckpointRef, LocalCheckpoint, merged_experts, registered_experts
from tasks.merge import MergedModel, MergeJob, WarmStart, merge_full, merge_incremental, merged_coefficients
from tasks.pipeline_state import taken_experts, untaken_experts
from tasks.stages import StageClock
from tasks.tracking import DECISION_TAG, NEW_EXPERT_SHA_TAG, NEW_EXPERT_TAG, REASON_TAG, log_run, tracked_run

FLOW_NAME = "on-new-expert"
# calibrated methods: "warm" (from the head's coefficients) or "cold" (every expert from scratch), and why
CALIBRATION_START_TAG, CALIBRATION_REASON_TAG = "mergeplan.calibration_start", "mergeplan.calibration_start_reason"
BUDGET_PARAMS = ("epochs", "keep_epochs", "warm_start")  # how long and from where: not what a coefficient means


log = logging.getLogger("mergeplan")


def refuse_other_base(base: str, s3_uri: str, config: PipelineConfig, settings: Settings) -> str | None:
    """Why this expert cannot join the pipeline's merges, or None."""
    if base != config.base.name:
        return (f"expert {s3_uri} was registered for base {base!r}, but this pipeline merges experts of "
                f"{config.base.name!r}; register it for {config.base.name} if it is a fine-tune of it")
    try:
        check_same_base(s3_uri, config.base.name, settings=settings)
    except ExpertRefused as exc:
        return str(exc)
    return None


def previous_merge(champion, config: PipelineConfig, job_of_champion) -> MergedModel | None:
    """The champion's merge as an input to an incremental one, when its accumulators can be reused here."""
    if champion.tags.get("method") != config.method or job_of_champion.cache_key != champion.tags.get(MERGE_KEY):
        return None  # another method, or other params: its accumulators do not apply
    state = job_of_champion.folder / "state"
    if not state.is_dir():
        return None
    return MergedModel(key=job_of_champion.cache_key, path=job_of_champion.output, state=state,
                       experts=[e.ref.name for e in job_of_champion.experts])


def _recipe(method: str, params: dict, seed: int) -> str | None:
    """The calibration's identity (its params with their defaults), its training budget aside; None for params
    the method refuses."""
    try:
        full = params_for(method).model_validate(params).model_dump(mode="json", exclude=set(BUDGET_PARAMS))
    except ValueError:
        return None
    return content_hash({"method": method, "seed": seed, "params": full})


def _learned_recipe(coefficients: Path) -> str | None:
    """The recipe a coefficients.json was learned with, or None when the file does not say."""
    try:
        config = json.loads(coefficients.read_text())["config"]
        return _recipe(config["method"], config["params"], config.get("seed", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def warm_start(config: PipelineConfig, head: ModelVersion | None, members: list[CheckpointRef],
               domain: str) -> tuple[WarmStart | None, str]:
    """Where the calibration of the head's experts plus DOMAIN starts: the head's coefficients, or None (cold);
    and why."""
    if not config.warm_start.enabled:
        return None, "warm starts are off (warm_start: false)"
    if head is None:
        return None, "no head yet"
    if any(e.domain == domain for e in members):
        return None, (f"a new version of {domain} replaces the head's: the head's coefficients were learned for the "
                      "expert it replaces")
    if head.tags.get("method") != config.method:
        return None, f"the head was merged with {head.tags.get('method')}, not {config.method}"
    key = head.tags[MERGE_KEY]
    coefficients, where = merged_coefficients(key, head.source)
    if coefficients is None:
        return None, f"the head's coefficients were not found: {where}"
    learned = _learned_recipe(coefficients)
    if learned is None or learned != _recipe(config.method, config.params, config.seed):
        return None, "the head was calibrated with other params or another seed"
    reason = f"from head version {head.version} (merge {key[:12]}), coefficients from {where}"
    return WarmStart(coefficients=coefficients, merge_key=key), reason


def calibration_start(run_id: str, job: MergeJob, config: PipelineConfig, head: ModelVersion | None,
                      members: list[CheckpointRef], domain: str) -> MergeJob:
    """JOB, warm-started when it can be; the run is tagged warm or cold, and why."""
    start, reason = warm_start(config, head, members, domain)
    log.info("%s start of the calibration: %s", "warm" if start else "cold", reason)
    log_run(run_id, tags={CALIBRATION_START_TAG: "warm" if start else "cold", CALIBRATION_REASON_TAG: reason})
    return job if start is None else job.warm_started(start, config.warm_start.epochs)


def _expected_local(ref: CheckpointRef) -> LocalCheckpoint:
    """Where the cache keeps REF: an incremental merge names the earlier experts but never reads them."""
    return LocalCheckpoint(ref=ref, path=ref.output.resolve())


def add_expert(config: PipelineConfig, s3_uri: str, sha256: str, version: str, domain: str, base: str,
               settings: Settings) -> Outcome:
    """One expert into the head: its own MLflow run, merge, evaluation, decision and registration."""
    clock = StageClock()
    with tracked_run(config.experiment_name, f"add {domain} v{version}",
                     run_tags(config, FLOW_NAME) | {NEW_EXPERT_TAG: s3_uri, NEW_EXPERT_SHA_TAG: sha256}) as run_id:
        refusal = refuse_other_base(base, s3_uri, config, settings)
        if refusal is not None:
            log_run(run_id, tags={DECISION_TAG: "refused", REASON_TAG: refusal})
            raise ExpertRefused(refusal)
        new = CheckpointRef(name=domain, domain=domain, uri=s3_uri, sha256=sha256, version=version)
        head = head_version(config.base.name, settings=settings)
        members = merged_experts(head) if head is not None else registered_experts(config.base.name, settings)
        base_checkpoint = pipeline_base(config, settings)
        local_base = fetch_one(base_checkpoint)
        data = fetch_data(config, settings)
        previous = None
        if head is not None and all(e.domain != domain for e in members) and not is_calibrated(config.method):
            previous_job = merge_job(config, local_base, [_expected_local(e) for e in members], data)
            previous = previous_merge(head, config, previous_job)
        if previous is not None:
            local_new = fetch_one(new)
            clock.lap("fetch")
            job = previous_job.extended(local_new)
            merged = fresh(merge_incremental, job)(job, previous, local_new)
        else:
            experts = [e for e in members if e.domain != domain] + [new]
            job = merge_job(config, local_base, fetch_many(experts), data)
            if is_calibrated(config.method):
                job = calibration_start(run_id, job, config, head, members, domain)
            clock.lap("fetch")
            merged = fresh(merge_full, job)(job)
        clock.lap("merge")
        return conclude(run_id, job, merged, data, config, clock, settings)


def add_untaken(config: PipelineConfig, experts: list[RegisteredExpert], settings: Settings) -> list[Outcome]:
    """An on-new-expert run (a subflow that does not drain) for each of EXPERTS, in order; a refused one (another
    base) is logged and skipped, as its run is tagged refused and will not be taken again. An outage is not
    caught: the run fails and a later one retries."""
    outcomes = []
    for expert in experts:
        try:
            outcome = on_new_expert(config, expert.s3_uri, expert.sha256, expert.version, expert.domain,
                                    expert.base, drain=False)
        except ExpertRefused as exc:
            log.warning("%s version %s not merged: %s", expert.model_name, expert.version, exc)
            continue
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


@flow(name=FLOW_NAME)
def on_new_expert(config: PipelineConfig, s3_uri: str, sha256: str, version: str, domain: str,
                  base: str, drain: bool = True) -> Outcome | None:
    """The outcome of adding this expert, or None when an earlier run already took it. With DRAIN (as triggered),
    the other untaken experts are added too, each in a subflow of its own that does not drain."""
    settings = recording_settings()
    taken = taken_experts(config.experiment_name, config.base.name, settings)
    if (s3_uri, sha256) in taken:
        log.info("%s (sha256 %s) was already merged by an earlier run; nothing to do", s3_uri, sha256[:12])
        return None
    untaken = untaken_experts(config.experiment_name, config.base.name, settings, taken) if drain else []
    position = next((i for i, e in enumerate(untaken) if (e.s3_uri, e.sha256) == (s3_uri, sha256)), None)
    if position is None:  # not draining, or not a registered expert's newest version: just this one
        return add_expert(config, s3_uri, sha256, version, domain, base, settings)
    add_untaken(config, untaken[:position], settings)  # registered before this one: they go first
    outcome = add_expert(config, s3_uri, sha256, version, domain, base, settings)
    add_untaken(config, untaken[position + 1:], settings)  # registered after: they need not wait for their runs
    return outcome
