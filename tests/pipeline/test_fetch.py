"""Fetching is cached on content: the same files stored in two folders (one expert uploaded for two bases, or a
re-registered copy) are downloaded once, yet each fetch is named as its own ref names it (folder, name, version),
or the run's lineage and the registry's 'taken' experts would name the other folder."""

from __future__ import annotations

from prefect import flow

from flows.inputs import fetch_many, fetch_one
from flows.pipeline_config import RunnerSettings
from flows.runtime import configured
from infra.s3 import expert_uri, upload_expert
from tasks.fetch import CheckpointRef, LocalCheckpoint


@flow
def fetch_in_turn(refs: list[CheckpointRef]) -> tuple[list[LocalCheckpoint], list[LocalCheckpoint]]:
    return [fetch_one(ref) for ref in refs], fetch_many(refs)


def test_a_cached_fetch_of_the_same_files_keeps_the_ref_it_was_asked_for(pipeline_env, tiny_zoo):
    refs = []
    for base, version in (("fetch-a", "3"), ("fetch-b", "7")):
        uri = expert_uri(base, "algebra", pipeline_env)
        manifest = upload_expert(tiny_zoo / "experts" / "algebra", uri, settings=pipeline_env)
        refs.append(CheckpointRef(name=f"algebra-{base}", domain="algebra", uri=uri, sha256=manifest.sha256,
                                  version=version))
    assert refs[0].sha256 == refs[1].sha256  # the same files: one cache entry

    one_by_one, in_parallel = configured(fetch_in_turn, RunnerSettings(), pipeline_env)(refs)
    for fetched in (one_by_one, in_parallel):
        assert [local.ref for local in fetched] == refs
        assert fetched[0].path == fetched[1].path and fetched[0].path.name == refs[0].sha256
