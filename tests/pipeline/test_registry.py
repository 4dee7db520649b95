"""The MLflow registry helpers against a real MLflow server (sqlite backend, artifacts on moto)."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient
from mlops_support import ACCESS_KEY, SECRET_KEY, WEBHOOK_SECRET, free_port

from infra.errors import RegistryError
from infra.registry import WEBHOOK_NAME, check_reachable, ensure_webhook, register_expert
from infra.s3 import expert_uri, s3_client, upload_expert
from merging.errors import CheckpointError
from merging.io.synthetic import llama_config, write_random_base


@pytest.fixture()
def mlflow(services) -> MlflowClient:
    return MlflowClient(services.mlflow_tracking_uri)


def test_register_creates_a_version_with_its_tags(services, stored_base, zoo, mlflow):
    uri = expert_uri("tiny-base", "algebra", services)
    manifest = upload_expert(zoo["experts"][0], uri, settings=services)
    expert = register_expert(uri, "algebra", "tiny-base", settings=services)

    version = mlflow.get_model_version("expert.tiny-base.algebra", expert.version)
    assert version.source == uri
    assert version.tags == {"domain": "algebra", "base": "tiny-base", "s3_uri": uri, "sha256": manifest.sha256}
    assert expert.sha256 == manifest.sha256


def test_same_content_is_not_registered_twice_new_content_is(services, stored_base, zoo, mlflow):
    uri = expert_uri("tiny-base", "code", services)
    upload_expert(zoo["experts"][1], uri, settings=services)
    first = register_expert(uri, "code", "tiny-base", settings=services)
    assert register_expert(uri, "code", "tiny-base", settings=services).version == first.version

    upload_expert(zoo["experts"][2], uri, settings=services)  # a new fine-tune of the same expert
    second = register_expert(uri, "code", "tiny-base", settings=services)
    assert int(second.version) == int(first.version) + 1 and second.sha256 != first.sha256
    assert len(mlflow.search_model_versions("name='expert.tiny-base.code'")) == 2


def test_expert_of_another_base_is_refused_with_the_field(services, stored_base, tmp_path, mlflow):
    other = write_random_base(tmp_path / "wide", llama_config(hidden_size=48, intermediate_size=48,
                                                               num_attention_heads=4, vocab_size=64))
    uri = expert_uri("tiny-base", "wide", services)
    upload_expert(other, uri, settings=services)
    with pytest.raises(RegistryError, match=r"wide/config\.json: hidden_size is 48, the base tiny-base .* has 32"):
        register_expert(uri, "wide", "tiny-base", settings=services)
    assert not mlflow.search_registered_models("name='expert.tiny-base.wide'")


def test_expert_under_another_base_folder_is_refused(services, stored_base):
    with pytest.raises(RegistryError, match="lies under base 'small-base', not 'tiny-base'"):
        register_expert(expert_uri("small-base", "algebra", services), "algebra", "tiny-base", settings=services)


def test_base_missing_from_the_store_says_how_to_upload_it(services, zoo):
    uri = expert_uri("lost-base", "algebra", services)
    upload_expert(zoo["experts"][0], uri, settings=services)
    with pytest.raises(RegistryError, match=r"base 'lost-base' is not in the store .*mergeplan expert upload"):
        register_expert(uri, "algebra", "lost-base", settings=services)


def test_names_with_dots_are_refused(services):
    with pytest.raises(RegistryError, match="domain name 'a.b'"):
        register_expert(expert_uri("tiny-base", "x", services), "a.b", "tiny-base", settings=services)


def test_unreachable_mlflow_fails_fast_before_touching_s3(services, tmp_path):
    tracking_uri = f"http://127.0.0.1:{free_port()}"
    settings = services.model_copy(update={"mlflow_tracking_uri": tracking_uri})
    s3 = s3_client(settings)
    calls: list[str] = []
    s3.meta.events.register("provide-client-params.s3.*", lambda params, **_: calls.append("s3"))
    started = time.monotonic()
    with pytest.raises(RegistryError, match=f"MLflow at {tracking_uri} is unreachable .*mergeplan up"):
        register_expert(expert_uri("tiny-base", "algebra", settings), "algebra", "tiny-base", settings=settings,
                        s3=s3)
    assert time.monotonic() - started < 5 and not calls


def test_reachability_check_answers_for_a_live_server(services):
    check_reachable(services.mlflow_tracking_uri)


def test_webhook_is_created_once(services, mlflow):
    first = ensure_webhook("http://127.0.0.1:9/first", WEBHOOK_SECRET, settings=services)
    second = ensure_webhook("http://127.0.0.1:9/second", WEBHOOK_SECRET, settings=services)
    hooks = [hook for hook in mlflow.list_webhooks() if hook.name == WEBHOOK_NAME]
    assert first == second and len(hooks) == 1 and hooks[0].url == "http://127.0.0.1:9/second"


def test_credentials_are_not_in_tags_or_server_logs(services, stored_base, zoo, mlflow):
    uri = expert_uri("tiny-base", "secrets", services)
    upload_expert(zoo["experts"][3], uri, settings=services)
    expert = register_expert(uri, "secrets", "tiny-base", settings=services)
    version = mlflow.get_model_version(expert.model_name, expert.version)
    recorded = json.dumps([version.tags, version.description, version.source])
    server_logs = "".join(path.read_text(errors="replace") for path in services.stack_dir.glob("*.log"))
    for secret in (SECRET_KEY, ACCESS_KEY, WEBHOOK_SECRET):
        assert secret not in recorded and secret not in server_logs


def test_a_lora_adapter_is_stored_and_registered_like_a_checkpoint(services, stored_base, zoo, tmp_path, mlflow):
    from merging.io.synthetic import write_random_lora

    adapter = write_random_lora(zoo["base"], tmp_path / "adapter", seed=3)
    uri = expert_uri("tiny-base", "lora", services)
    manifest = upload_expert(adapter, uri, settings=services)
    assert set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}
    expert = register_expert(uri, "lora", "tiny-base", settings=services)
    assert mlflow.get_model_version("expert.tiny-base.lora", expert.version).tags["sha256"] == manifest.sha256
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="peft_type is .IA3."):
        upload_expert(adapter, uri, settings=services)
