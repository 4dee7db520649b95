"""What a reviewer reads about one merging run, written once and shown in three places: the MLflow run's
description, the merged model version's description (its card: lineage, scores, decision), and the Prefect flow
run's markdown artifact (with a link to the MLflow run)."""

from __future__ import annotations

from pydantic import BaseModel

from flows.pipeline_config import PipelineConfig
from infra.registry import expert_model_name, merged_model_name
from tasks.decide import Decision
from tasks.merge import MergeJob
from tasks.tracking import json_tag


class Comparison(BaseModel):
    """Per-domain CE of the new merge, of the base and of the champion it was compared with (None: none yet)."""

    ce: dict[str, float]
    macro_ce: float
    base_ce: dict[str, float]
    base_macro_ce: float
    champion_version: str | None = None
    champion_ce: dict[str, float] = {}
    champion_macro_ce: float | None = None


def decision_sentence(config: PipelineConfig, job: MergeJob, comparison: Comparison, decision: Decision,
                      version: str, crowned: bool) -> str:
    """One sentence with the numbers: what was merged, how it scored against the champion, what comes next."""
    against = ("the first champion" if comparison.champion_version is None else
               f"champion v{comparison.champion_version} {comparison.champion_macro_ce:.4f}")
    verdict = "new champion" if crowned else "champion kept"
    return (f"{config.method} of {len(job.experts)} experts: macro CE {comparison.macro_ce:.4f} (base "
            f"{comparison.base_macro_ce:.4f}, {against}); version {version}, {verdict}; "
            f"{decision.reason}")  # the reason starts with its action


def domain_table(comparison: Comparison) -> dict[str, list]:
    """Columns for mlflow.log_table: one row per domain, so that runs line up in the UI's comparison view."""
    domains = sorted(comparison.ce)
    return {"domain": domains, "ce": [comparison.ce[d] for d in domains],
            "base_ce": [comparison.base_ce.get(d) for d in domains],
            "vs_base": [comparison.ce[d] - comparison.base_ce[d] if d in comparison.base_ce else None
                        for d in domains],
            "champion_ce": [comparison.champion_ce.get(d) for d in domains],
            "vs_champion": [comparison.ce[d] - comparison.champion_ce[d] if d in comparison.champion_ce else None
                            for d in domains]}


def lineage_tags(job: MergeJob, base: str) -> dict[str, str]:
    """Tags of the merged model version naming what it holds: each expert's model version and sha256, the base."""
    tags = {"base": base, "base.sha256": job.base.ref.sha256}
    for expert in job.experts:
        ref = expert.ref
        tags[f"expert.{ref.name}.model"] = expert_model_name(base, ref.domain)
        tags[f"expert.{ref.name}.version"] = ref.version or "unregistered"
        tags[f"expert.{ref.name}.sha256"] = ref.sha256
    return tags


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def review_markdown(config: PipelineConfig, job: MergeJob, comparison: Comparison, decision: Decision,
                    version: str, crowned: bool, run_link: str, calibration: dict[str, str]) -> str:
    """The card of the merged model version and the summary of the run: decision, scores, lineage, recipe."""
    champion = f"champion v{comparison.champion_version}" if comparison.champion_version else "champion"
    champion_macro = comparison.champion_macro_ce
    macro_vs_champion = None if champion_macro is None else comparison.macro_ce - champion_macro
    table = domain_table(comparison)
    rows = "\n".join(
        f"| {d} | {ce:.4f} | {'' if b is None else f'{b:.4f}'} | {_signed(vb)} | "
        f"{'' if c is None else f'{c:.4f}'} | {_signed(vc)} |"
        for d, ce, b, vb, c, vc in zip(*table.values(), strict=True))
    experts = "\n".join(f"| {e.ref.name} | {expert_model_name(config.base.name, e.ref.domain)} | "
                        f"{e.ref.version or 'unregistered'} | `{e.ref.sha256[:16]}` |" for e in job.experts)
    lines = [
        f"# {merged_model_name(config.base.name)} version {version}",
        decision_sentence(config, job, comparison, decision, version, crowned),
        f"## Held-out CE per domain (nats per response token)\n\n| domain | CE | base | vs base | {champion} | "
        f"vs {champion} |\n|---|---|---|---|---|---|\n{rows}\n| **macro** | {comparison.macro_ce:.4f} | "
        f"{comparison.base_macro_ce:.4f} | {_signed(comparison.macro_ce - comparison.base_macro_ce)} | "
        f"{'' if champion_macro is None else f'{champion_macro:.4f}'} | {_signed(macro_vs_champion)} |",
        f"## Lineage\n\nBase `{config.base.name}` (manifest sha256 `{job.base.ref.sha256[:16]}`).\n\n"
        f"| expert | registered model | version | manifest sha256 |\n|---|---|---|---|\n{experts}",
        f"## Recipe\n\nmethod `{config.method}`, params `{json_tag(config.params)}`, seed {config.seed}"
        + ("".join(f"\n- calibration `{name}`: sha256 `{digest[:16]}`" for name, digest in calibration.items())),
        f"## Decision\n\n{decision.reason}",
        f"MLflow run: {run_link}",
    ]
    return "\n\n".join(lines) + "\n"
