"""`scaling-sweep`: merge and evaluate subsets of the base's experts with each method of `sweep:` (a task per
subset, dealt to the task runner's workers), fit the law on the table of their rows, and plan. One MLflow run with
a nested run per merged subset; the sweep table, the fit and its plots and the plan are its artifacts. A sweep run
again after a failure measures only the subsets it had not finished (each subset's rows are a cached task result).

Run as a script with a Dask runner, this module needs its `if __name__ == "__main__"` guard: Dask's worker
processes import the main module again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from flows.inputs import run_tags, start_flow
from flows.pipeline_config import PipelineConfig, load_pipeline_config
from flows.runtime import configured, prefect_api
from infra.settings import Settings
from merging.scaling_law.advice import PlanRequest, plan_from_fit
from merging.scaling_law.sweep_curves import MACRO
from tasks.caching import fresh
from tasks.fetch import data_ref
from tasks.sweep import FitJob, SweepFit, SweepMerge, fit_tables, release_family, sweep_jobs, sweep_merge
from tasks.tracking import DECISION_TAG, REASON_TAG, NestedRun, json_tag, log_nested_runs, log_run, tracked_run

FLOW_NAME = "scaling-sweep"


class SweepOutcome(BaseModel):
    run_id: str
    table: Path
    fit: Path
    merges: int
    plan: dict[str, str]  # method -> sentence


def merge_runs(merges: list[SweepMerge]) -> list[NestedRun]:
    """One nested run per merged subset: its CE per domain and their macro mean."""
    runs = []
    for merge in merges:
        method, subset, k = (merge.rows[0][name] for name in ("method", "subset", "k"))
        ce = {row["domain"]: row["ce"] for row in merge.rows}
        runs.append(NestedRun(name=f"{method} {subset}", params={"method": method, "subset": subset, "k": k},
                              metrics={"experts": k, "macro_ce": sum(ce.values()) / len(ce)}
                              | {f"ce.{domain}": value for domain, value in ce.items()}))
    return runs


def plan_markdown(plan: dict[str, str], fit: SweepFit) -> str:
    lines = ["# Scaling-sweep plan", "", *[f"- **{method}**: {sentence}" for method, sentence in plan.items()], "",
             "| method | floor | A | b | R² |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {row['method']} | {row['floor']:.4f} | {row['amplitude']:.4f} | {row['offset']:.3f} | "
              f"{row['r_squared']:.3f} |" for row in fit.summary if row["domain"] == MACRO]
    return "\n".join(lines) + "\n"


@flow(name=FLOW_NAME)
def scaling_sweep(config: PipelineConfig) -> SweepOutcome:
    settings, clock, base, experts = start_flow(config)
    sweep = config.sweep
    tags = run_tags(config, FLOW_NAME)
    with tracked_run(config.experiment_name, f"sweep {'+'.join(sweep.methods)} M={len(experts)}", tags) as run_id:
        jobs = sweep_jobs(base, experts, data_ref(config.data, settings), sweep)
        swept = [future.result() for future in [sweep_merge.submit(job) for job in jobs]]
        release_family()
        clock.lap("sweep")
        job = FitJob(merges=swept, settings={"seed": config.seed})
        fit = fresh(fit_tables, job)(job)
        clock.lap("fit")
        request = PlanRequest(target_loss=config.law.target_loss, epsilon=config.law.epsilon,
                              min_gain=config.law.min_gain)
        plan = {line.method: line.sentence for line in plan_from_fit(fit.fit, request)}
        merges = merge_runs(swept)
        log_nested_runs(run_id, config.experiment_name, tags | {"mergeplan.sweep_merge": "true"}, merges)
        clock.lap("log")
        metrics = {f"law.{row['method']}.{name}": row[name] for row in fit.summary if row["domain"] == MACRO
                   for name in ("floor", "amplitude", "offset", "r_squared")}
        metrics |= {f"stage.{stage}.seconds": seconds for stage, seconds in clock.seconds.items()}
        for sweep_job, merge in zip(jobs, swept, strict=True):
            key = f"stage.sweep.{sweep_job.method}.compute_seconds"
            metrics[key] = metrics.get(key, 0.0) + merge.cost.seconds + merge.load_seconds
        metrics |= {"merges": len(merges), "flow.seconds": clock.total}
        decision = plan.get(config.method, next(iter(plan.values())))
        log_run(run_id, params={"methods": ",".join(sweep.methods), "design": sweep.design,
                                "max_subsets": sweep.max_subsets, "eval_examples": sweep.eval_examples,
                                "seed": sweep.seed, "params": json_tag({m: sweep.method_params(m)
                                                                       for m in sweep.methods}),
                                "experts": ",".join(e.name for e in experts)}
                | {f"expert.{e.name}.sha256": e.sha256 for e in experts},
                metrics=metrics, texts={"plan.md": plan_markdown(plan, fit)},
                files=[("", fit.table), ("fit", fit.fit / "fit.json"), ("fit", fit.fit / "summary.csv")]
                + [(f"fit/{png.parent.relative_to(fit.fit).as_posix()}", png)
                   for png in sorted((fit.fit / "plots").rglob("*.png"))],
                tags={DECISION_TAG: "plan", REASON_TAG: decision})
    return SweepOutcome(run_id=run_id, table=fit.table, fit=fit.fit, merges=len(merges), plan=plan)


if __name__ == "__main__":  # python -m flows.scaling_sweep PIPELINE_YAML
    pipeline = load_pipeline_config(sys.argv[1])
    environment = Settings.from_env()
    with prefect_api(environment):
        print(configured(scaling_sweep, pipeline.runner, environment)(pipeline))
