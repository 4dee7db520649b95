"""Model references of mergekit configs resolved to local folders, offline: nothing is ever downloaded.

A reference is what mergekit 0.1.5 accepts (its ModelReference / ModelPath): a folder (relative to the YAML
file's folder, or absolute) or a hub id `org/name`, each optionally `@revision`; `MODEL+LORA` applies a PEFT
adapter (itself a folder or hub id) to MODEL; or the dict form `{model: REF | {path: P, revision: R}, lora: ...,
override_architecture: ...}`. As in mergekit, a folder that exists wins over a hub id spelled the same (its
revision is then ignored). A hub id is looked up in MODEL_DIR (MODEL_DIR/org/name,
MODEL_DIR/name, or a Hugging Face cache layout there), then in the local Hugging Face cache ($HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub): models--org--name/snapshots/COMMIT, where refs/BRANCH-OR-TAG holds
the commit and a full 40-character commit hash names the snapshot directly (the default revision is main).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from merging.errors import ConfigError

log = logging.getLogger("mergeplan")
DEFAULT_REVISION = "main"
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
# huggingface_hub's repo id rule: an optional namespace, a name of letters, digits, - _ . (no -- or ..)
HUB_ID = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,94}[A-Za-z0-9_]/|[A-Za-z0-9_]/)?"
                    r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,94}[A-Za-z0-9_]|[A-Za-z0-9_])")
DICT_FIELDS = {"model", "lora", "override_architecture"}


class ResolvedModel(BaseModel):
    """A reference's local folders: the checkpoint, and the PEFT adapter to apply to it (MODEL+LORA)."""

    model_config = ConfigDict(frozen=True)
    path: Path  # absolute
    lora: Path | None = None  # absolute
    name: str  # a short name: the folder's, or the hub id's last part; `+` the adapter's with a LoRA


def hub_cache() -> Path:
    """The local Hugging Face hub cache, found as huggingface_hub finds it (read at each call)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return _expand(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return _expand(os.environ["HF_HOME"]) / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return _expand(cache) / "huggingface" / "hub"


def _expand(path: str) -> Path:
    return Path(os.path.abspath(os.path.expandvars(os.path.expanduser(path))))


def _split_revision(text: str, field: str) -> tuple[str, str | None]:
    """mergekit's ModelPath string: PATH or PATH@REVISION (one @ at most)."""
    if text.count("@") > 1:
        raise ConfigError(f"{field}: {text!r} has more than one @; write PATH or ORG/NAME@REVISION")
    path, _, revision = text.partition("@")
    if "@" in text and not revision:
        raise ConfigError(f"{field}: {text!r} has an empty revision after @; name a branch, tag or commit")
    return path, revision or None


def _model_path(value: Any, field: str) -> tuple[str, str | None]:
    """(path or hub id, revision) from a string or mergekit's {path: ..., revision: ...}."""
    if isinstance(value, str):
        path, revision = _split_revision(value, field)
    elif isinstance(value, dict) and isinstance(value.get("path"), str):
        unknown = sorted(set(value) - {"path", "revision"})
        if unknown:
            log.warning("%s: %s ignored (mergekit ignores it too)", field, ", ".join(map(str, unknown)))
        path, revision = value["path"], value.get("revision")
        if revision is not None and (not isinstance(revision, str) or not revision):
            raise ConfigError(f"{field}.revision: {revision!r}; expected a branch, tag or commit hash")
    else:
        raise ConfigError(f"{field}: {value!r}; expected a folder or hub id (ORG/NAME[@REVISION]), or "
                          "{path: ..., revision: ...}")
    if not path:
        raise ConfigError(f"{field}: empty model path; expected a folder or hub id (ORG/NAME[@REVISION])")
    return path, revision


def parse_reference(reference: str | dict, field: str) -> tuple[tuple[str, str | None], tuple[str, str | None] | None]:
    """((model, revision), (lora, revision) or None), as mergekit's ModelReference parses them."""
    if isinstance(reference, str):
        chunks = reference.split("+")
        if len(chunks) > 2:
            raise ConfigError(f"{field}: {reference!r} has more than one +; write MODEL or MODEL+LORA")
        model = _model_path(chunks[0], field)
        return model, _model_path(chunks[1], f"{field} (its LoRA)") if len(chunks) == 2 else None
    if not isinstance(reference, dict) or "model" not in reference:
        raise ConfigError(f"{field}: {reference!r}; expected MODEL, MODEL+LORA or {{model: ..., lora: ...}}")
    unknown = sorted(map(str, set(reference) - DICT_FIELDS))
    if unknown:
        log.warning("%s: %s ignored (mergekit ignores it too)", field, ", ".join(unknown))
    if reference.get("override_architecture") is not None:
        log.warning("%s: override_architecture ignored: mergeplan merges every tensor by name, whatever the "
                    "architecture", field)
    lora = reference.get("lora")
    return (_model_path(reference["model"], f"{field}.model"),
            None if lora is None else _model_path(lora, f"{field}.lora"))


class ModelResolver:
    """Resolves a config's model references to local folders (see the module's docstring for the order)."""

    def __init__(self, config_folder: Path, model_dir: Path | None = None):
        self.config_folder = Path(os.path.abspath(config_folder))
        self.model_dir = None if model_dir is None else _expand(str(model_dir))
        self.cache = hub_cache()

    def resolve(self, reference: str | dict, field: str) -> ResolvedModel:
        """The folders REFERENCE names; FIELD (e.g. "merge.yaml: models[1].model") starts every error."""
        (model, revision), lora = parse_reference(reference, field)
        path = self._find(model, revision, field)
        if lora is None:
            return ResolvedModel(path=path, name=self._name(model, path))
        lora_path = self._find(*lora, f"{field} (its LoRA)")
        return ResolvedModel(path=path, lora=lora_path,
                             name=f"{self._name(model, path)}+{self._name(lora[0], lora_path)}")

    def _local(self, path: Path) -> Path:
        return Path(os.path.abspath(self.config_folder / path))

    @staticmethod
    def _name(reference: str, path: Path) -> str:
        return reference.rstrip("/").rsplit("/", 1)[-1] if HUB_ID.fullmatch(reference) else path.name

    def _find(self, reference: str, revision: str | None, field: str) -> Path:
        local = self._local(Path(reference))
        if local.is_dir():
            if revision is not None:
                log.warning("%s: %s is a local folder; revision %s ignored (as mergekit does)", field, local,
                            revision)
            return local
        shown = reference + (f"@{revision}" if revision else "")
        if not is_hub_id(reference):
            raise ConfigError(f"{field}: {shown}: no such folder ({local}), and not a hub id (ORG/NAME); "
                              "fix the path (relative paths start at the YAML file's folder)")
        _check_revision(revision, field, shown)
        searched = [str(local)]
        if self.model_dir is not None:
            name = reference.rsplit("/", 1)[-1]
            for candidate in dict.fromkeys([self.model_dir / reference, self.model_dir / name]):
                if candidate.is_dir():
                    if revision is not None:
                        log.warning("%s: %s found as the folder %s; its revision cannot be checked there",
                                    field, shown, candidate)
                    return candidate
                searched.append(str(candidate))
            found = _snapshot(self.model_dir, reference, revision, searched)
            if found is not None:
                return found
        found = _snapshot(self.cache, reference, revision, searched)
        if found is not None:
            return found
        hint = (" (a commit revision must be the full 40-character hash)"
                if revision and re.fullmatch(r"[0-9a-f]{7,39}", revision) else "")
        download = f"hf download {reference}" + (f" --revision {revision}" if revision else "")
        raise ConfigError(f"{field}: {reference} (revision {revision or DEFAULT_REVISION}{hint}) is not on this "
                          f"machine; searched {'; '.join(searched)}. Pass --model-dir DIR, or download it first "
                          f"(`{download}`, or `huggingface-cli download` with older huggingface_hub); mergeplan "
                          "never downloads")


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".git")


def _check_revision(revision: str | None, field: str, shown: str) -> None:
    if revision is not None and (revision.startswith("/") or ".." in revision.split("/") or "\\" in revision):
        raise ConfigError(f"{field}: {shown}: revision {revision!r} is not a branch, tag or commit hash")


def _snapshot(cache: Path, repo_id: str, revision: str | None, searched: list[str]) -> Path | None:
    """The snapshot folder of REPO_ID at REVISION in a Hugging Face cache, or None (adding what was looked at)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = revision or DEFAULT_REVISION
    if COMMIT_HASH.fullmatch(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        try:
            commit = ref.read_text().strip()
        except (OSError, UnicodeDecodeError):
            searched.append(f"{ref} (no such ref)" if repo.is_dir() else str(repo))
            return None
        if not COMMIT_HASH.fullmatch(commit):
            searched.append(f"{ref} (holds {commit[:50]!r}, not a commit hash)")
            return None
    snapshot = repo / "snapshots" / commit
    if snapshot.is_dir():
        return snapshot
    searched.append(str(snapshot))
    return None
