"""Loading Hugging Face models here: safetensors only, no remote code, no hub, no progress bars."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from merging.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time


def quiet_transformers() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def load_causal_lm(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A local causal LM from safetensors (never pickle, never trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                                local_files_only=True)


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)


def load_model_config(folder: str | Path):
    from transformers import AutoConfig

    quiet_transformers()
    return AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)


def causal_lm_skeleton(folder: str | Path):
    """The model's modules without weights (on the meta device): for running one block at a time."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_model_config(folder), trust_remote_code=False)


def check_causal_lm(folder: Path) -> None:
    """Refuse a folder that is not a Hugging Face causal LM with its tokenizer."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json; expected a Hugging Face model folder (config.json + safetensors)")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise ConfigError(f"{folder}: architectures {architectures} is not a causal LM (*ForCausalLM)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer files next to the model; copy the zoo's tokenizer/ there")
