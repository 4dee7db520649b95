"""What a reviewer reads about one merging run, written once and shown in three places: the MLflow run's
description, the merged model version's description (its card: lineage, scores, decision), and the Prefect flow
run's markdown artifact (with a link to the MLflow run)."""

from __future__ import annotations

from pydantic import BaseModel

from flows.pipeline_config import ChampionRule, PipelineConfig
from infra.registry import Lineage, merged_model_name
from merging.errors import ConfigError
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


class Crowning(BaseModel):
    """Whether the merge became the champion, and the words that say why."""

    crowned: bool
    verdict: str


def rule_score(ce: dict[str, float], rule: ChampionRule, whose: str) -> float:
    """The CE the champion rule compares: the mean over its domains (every domain of CE by default)."""
    domains = rule.domains or sorted(ce)
    missing = [d for d in domains if d not in ce]
    if missing:
        raise ConfigError(f"champion.domains: {missing[0]!r} has no CE for {whose} (evaluated: {sorted(ce)}); name "
                          "evaluated domains only")
    return sum(ce[d] for d in domains) / len(domains)


def crowning(comparison: Comparison, rule: ChampionRule, already_champion: bool) -> Crowning:
    """The base is the zeroth champion: the merge is crowned when its score beats the base's and the champion's
    (when there is one) by more than the rule's margin."""
    what = "macro CE" if rule.domains is None else f"mean CE of {', '.join(rule.domains)}"
    if already_champion:
        return Crowning(crowned=False, verdict="already the champion")
    score = rule_score(comparison.ce, rule, "this merge")
    gap_to_base = score - rule_score(comparison.base_ce, rule, "the base")
    if gap_to_base >= -rule.margin:
        keeps = "the base stays the champion" if comparison.champion_version is None else \
            f"champion v{comparison.champion_version} kept"
        return Crowning(crowned=False, verdict=f"not crowned: {what} {gap_to_base:+.4f} against the base "
                                               f"(must beat it by more than {rule.margin:g}); {keeps}")
    if comparison.champion_version is None:
        return Crowning(crowned=True, verdict=f"new champion: {what} {gap_to_base:+.4f} against the base")
    champion = f"champion v{comparison.champion_version}"
    gap = score - (comparison.champion_macro_ce if rule.domains is None else
                   rule_score(comparison.champion_ce, rule, champion))
    if gap >= -rule.margin:
        return Crowning(crowned=False, verdict=f"{champion} kept: {what} {gap:+.4f} against it (must beat it by "
                                               f"more than {rule.margin:g})")
    return Crowning(crowned=True, verdict=f"new champion: {what} {gap:+.4f} against v{comparison.champion_version}")


def worse_than_base(comparison: Comparison) -> dict[str, float]:
    """The domains on which the merge's CE is above the base's, with the gap."""
    return {d: ce - comparison.base_ce[d] for d, ce in sorted(comparison.ce.items())
            if d in comparison.base_ce and ce > comparison.base_ce[d]}


def decision_sentence(config: PipelineConfig, job: MergeJob, comparison: Comparison, decision: Decision,
                      version: str, crowning: Crowning) -> str:
    """One sentence with the numbers: what was merged, how it scored against the base and the champion, what comes
    next."""
    against = ("no champion yet" if comparison.champion_version is None else
               f"champion v{comparison.champion_version} {comparison.champion_macro_ce:.4f}")
    worse = worse_than_base(comparison)
    below_base = f"; worse than the base on {', '.join(worse)}" if worse else ""
    return (f"{config.method} of {len(job.experts)} experts: macro CE {comparison.macro_ce:.4f} (base "
            f"{comparison.base_macro_ce:.4f}, {against}); version {version}, {crowning.verdict}{below_base}; "
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


def lineage_tags(job: MergeJob, base: str, lineage: dict[str, Lineage]) -> dict[str, str]:
    """Tags of the merged model version naming what it holds: each expert's registered model, version and sha256
    (or why it has none), the base."""
    tags = {"base": base, "base.sha256": job.base.ref.sha256}
    for expert in job.experts:
        ref, found = expert.ref, lineage[expert.ref.name]
        tags[f"expert.{ref.name}.model"] = found.model_name or "unregistered"
        tags[f"expert.{ref.name}.version"] = found.version or "unregistered"
        tags[f"expert.{ref.name}.sha256"] = ref.sha256
        tags[f"expert.{ref.name}.uri"] = ref.uri
        if found.unregistered_reason:
            tags[f"expert.{ref.name}.unregistered"] = found.unregistered_reason
    return tags


def _lineage_row(ref, found: Lineage) -> str:
    if found.version is None:
        return f"| {ref.name} | unregistered: {found.unregistered_reason} | | `{ref.sha256[:16]}` |"
    return f"| {ref.name} | {found.model_name} | {found.version} | `{ref.sha256[:16]}` |"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def review_markdown(config: PipelineConfig, job: MergeJob, comparison: Comparison, decision: Decision,
                    version: str, crowning: Crowning, lineage: dict[str, Lineage], run_link: str,
                    calibration: dict[str, str]) -> str:
    """The card of the merged model version and the summary of the run: decision, scores, lineage, recipe."""
    champion = f"champion v{comparison.champion_version}" if comparison.champion_version else "champion"
    champion_macro = comparison.champion_macro_ce
    macro_vs_champion = None if champion_macro is None else comparison.macro_ce - champion_macro
    table = domain_table(comparison)
    rows = "\n".join(
        f"| {d} | {ce:.4f} | {'' if b is None else f'{b:.4f}'} | {_signed(vb)} | "
        f"{'' if c is None else f'{c:.4f}'} | {_signed(vc)} |"
        for d, ce, b, vb, c, vc in zip(*table.values(), strict=True))
    experts = "\n".join(_lineage_row(e.ref, lineage[e.ref.name]) for e in job.experts)
    worse = worse_than_base(comparison)
    against_base = (f"Worse than the base on {len(worse)} of {len(comparison.ce)} domains: "
                    + ", ".join(f"{d} ({gap:+.4f})" for d, gap in worse.items()) if worse else
                    "Better than the base on every domain.")
    lines = [
        f"# {merged_model_name(config.base.name)} version {version}",
        decision_sentence(config, job, comparison, decision, version, crowning),
        f"## Held-out CE per domain (nats per response token)\n\n| domain | CE | base | vs base | {champion} | "
        f"vs {champion} |\n|---|---|---|---|---|---|\n{rows}\n| **macro** | {comparison.macro_ce:.4f} | "
        f"{comparison.base_macro_ce:.4f} | {_signed(comparison.macro_ce - comparison.base_macro_ce)} | "
        f"{'' if champion_macro is None else f'{champion_macro:.4f}'} | {_signed(macro_vs_champion)} |\n\n"
        f"{against_base}",
        f"## Lineage\n\nBase `{config.base.name}` (manifest sha256 `{job.base.ref.sha256[:16]}`).\n\n"
        f"| expert | registered model | version | manifest sha256 |\n|---|---|---|---|\n{experts}",
        f"## Recipe\n\nmethod `{config.method}`, params `{json_tag(config.params)}`, seed {config.seed}"
        + ("".join(f"\n- calibration `{name}`: sha256 `{digest[:16]}`" for name, digest in calibration.items())),
        f"## Decision\n\n{decision.reason}",
        f"MLflow run: {run_link}",
    ]
    return "\n\n".join(lines) + "\n"
