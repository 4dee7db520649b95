"""Held-out evaluation of a merged model as a Prefect task, cached on (model content key, data hash, settings)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

# Resolved here, once: transformers' lazy module import is not thread-safe, and two evaluations starting at once on
# the thread runner fail with "cannot import name AutoTokenizer".
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from merging.evaluate import evaluate
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash
from tasks.merge import MergedModel
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
