"""Held-out evaluation of a merged model as a Prefect task, cached on (model content key, data hash, settings); and a
merge measured where it runs (merged, then evaluated, on one Dask worker), for the law's points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

# Resolved here, once: transformers' lazy module import is not thread-safe, and two evaluations starting at once on
# the thread runner fail with "cannot import name AutoTokenizer".
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from merging.evaluate import evaluate
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash, fresh
from tasks.fetch import LocalCheckpoint, local_copy
from tasks.merge import MergedModel, MergeJob, merge_full
from tasks.stages import StageCost, measured


class EvalJob(BaseModel):
    model_config = ConfigDict(frozen=True)
    model: MergedModel
    data: Path
    data_sha256: str
    split: str = "eval"
    domains: list[str] | None = None
    max_examples: int | None = None
    batch_size: int = 32
    accuracy_samples: int = 0

    @property
    def cache_key(self) -> str:
        return content_hash(self.model_dump(mode="json", exclude={"model", "data"}) | {"model": self.model.key})


class Scores(BaseModel):
    """CE (nats/token) per domain, their macro and token-weighted micro means, and exact-match accuracy."""

    ce: dict[str, float]
    macro_ce: float
    micro_ce: float
    accuracy: dict[str, float]
    cost: StageCost


@task(name="evaluate", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER)
def evaluate_merged(job: EvalJob) -> Scores:
    with measured() as cost:
        result = evaluate(job.model.path, job.data, job.domains, job.split, job.batch_size,
                          accuracy_samples=job.accuracy_samples, max_examples=job.max_examples)
    return Scores(ce={d.domain: d.ce for d in result.domains}, macro_ce=result.macro_ce, micro_ce=result.micro_ce,
                  accuracy={d.domain: d.accuracy for d in result.domains if d.accuracy is not None}, cost=cost)


class MergeAndEvaluate(BaseModel):
    """A merge to score wherever it runs: its inputs fetched to that machine (from S3 on a Dask worker), merged and
    evaluated there, so that the merged folder is never read from another machine. The law's prefix points."""

    model_config = ConfigDict(frozen=True)
    merge: MergeJob
    data: LocalCheckpoint  # the copy where the job was made; a worker fetches its own by the ref
    evaluation: dict[str, Any]  # EvalJob's settings: split, domains, max_examples, batch_size, accuracy_samples

    @property
    def k(self) -> int:
        return len(self.merge.experts)

    @property
    def cache_key(self) -> str:
        return content_hash({"merge": self.merge.cache_key, "data": self.data.ref.sha256, "eval": self.evaluation})


class MergeScores(BaseModel):
    model: MergedModel  # its folder is on the machine that merged it
    scores: Scores


@task(name="merge-and-evaluate", cache_policy=content_cache(), persist_result=True,
      result_serializer=RESULT_SERIALIZER, task_run_name="measure {job.merge.method} k={job.k}")
def merge_and_evaluate(job: MergeAndEvaluate) -> MergeScores:
    data = local_copy(job.data.ref)
    merge = job.merge.fetched_here(job.data.path, data.path)
    model = fresh(merge_full, merge)(merge)
    scores = evaluate_merged(EvalJob(model=model, data=data.path, data_sha256=data.ref.sha256, **job.evaluation))
    return MergeScores(model=model, scores=scores)
