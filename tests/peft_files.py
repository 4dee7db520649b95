"""PEFT LoRA adapters saved by peft itself (random A and B), for the tests of adapters as experts."""

import json
from pathlib import Path

import torch


def peft_adapter(base: Path, folder: Path, seed: int, **lora) -> tuple[Path, Path]:
    """A peft-trained-looking adapter (random A and B) saved by peft, and its merge_and_unload()-ed copy."""
    from peft import LoraConfig, get_peft_model

    from merging.io.hf_loading import load_causal_lm

    torch.manual_seed(seed)
    model = load_causal_lm(base)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                "init_lora_weights": False} | lora
    adapted = get_peft_model(model, LoraConfig(**settings))
    adapted.save_pretrained(folder / "adapter")
    config_path = folder / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text()) | {"base_model_name_or_path": str(base)}
    config_path.write_text(json.dumps(config))
    adapted.merge_and_unload().save_pretrained(folder / "dense")
    return folder / "adapter", folder / "dense"
