"""Random Llama-architecture checkpoints, written tensor by tensor, for tests, the demo and benchmarks.

They are standard Hugging Face folders (AutoModelForCausalLM loads them) built without downloading
anything and without holding a whole model in memory. Experts are the base plus seeded noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merging.io.checkpoint import DEFAULT_MAX_SHARD_SIZE, CheckpointReader, CheckpointWriter
from merging.seeding import generator

INIT_STD = 0.02


def llama_config(hidden_size: int = 64, intermediate_size: int = 172, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int = 256,
                 tie_word_embeddings: bool = False, dtype: str = "bfloat16") -> dict:
    """A config.json for LlamaForCausalLM of the given size."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads, "vocab_size": vocab_size,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "dtype": dtype,
    }


def llama_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of LlamaForCausalLM, in the order transformers saves them."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_dim, kv_dim = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes += [
            (f"{layer}.input_layernorm.weight", (hidden,)),
            (f"{layer}.self_attn.q_proj.weight", (q_dim, hidden)),
            (f"{layer}.self_attn.k_proj.weight", (kv_dim, hidden)),
            (f"{layer}.self_attn.v_proj.weight", (kv_dim, hidden)),
            (f"{layer}.self_attn.o_proj.weight", (hidden, q_dim)),
            (f"{layer}.post_attention_layernorm.weight", (hidden,)),
            (f"{layer}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{layer}.mlp.up_proj.weight", (inter, hidden)),
            (f"{layer}.mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (config["vocab_size"], hidden)))
    return shapes


def write_random_base(folder: str | Path, config: dict, seed: int = 0,
                      max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """A base checkpoint: norms at 1, other weights N(0, 0.02), each tensor seeded by its name."""
    dtype = getattr(torch, config["dtype"])
    shapes = llama_shapes(config)
    with CheckpointWriter(folder, [(n, dtype, s) for n, s in shapes], max_shard_size=max_shard_size) as out:
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape)
            else:
                tensor = torch.randn(shape, generator=generator(seed, name)) * INIT_STD
            out.write(name, tensor.to(dtype))
        out.write_json("config.json", config)
    return Path(folder)


def write_random_expert(base_folder: str | Path, folder: str | Path, seed: int, scale: float = 0.1,
                        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """An 'expert': the base plus N(0, scale·0.02) on every tensor, seeded by (seed, tensor name)."""
    base = CheckpointReader(base_folder)
    layout = [(n, i.dtype, i.shape) for n, i in base.tensors.items()]
    with CheckpointWriter(folder, layout, max_shard_size=max_shard_size) as out:
        for name, info in base.tensors.items():
            noise = torch.randn(info.shape, generator=generator(seed, name)) * (scale * INIT_STD)
            out.write(name, (base.read(name).float() + noise).to(info.dtype))
        out.write_text("config.json", json.dumps(base.config, indent=2))
    return Path(folder)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_lora(base_folder: str | Path, folder: str | Path, seed: int, rank: int = 4, alpha: float = 8.0,
                      targets: tuple[str, ...] = LORA_TARGETS, scale: float = 0.1, dtype: str = "float32",
                      use_rslora: bool = False) -> Path:
    """A PEFT LoRA adapter folder for the base: A ~ N(0, 0.02), B ~ N(0, scale·0.02) on the target modules,
    seeded by (seed, tensor name); written without peft, in the layout peft's save_pretrained uses."""
    base = CheckpointReader(base_folder)
    torch_dtype = getattr(torch, dtype)
    factors = []
    for name, info in base.tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".")[-1] in targets and len(info.shape) == 2:
            rows, columns = info.shape
            factors += [(f"base_model.model.{module}.lora_A.weight", (rank, columns), INIT_STD),
                        (f"base_model.model.{module}.lora_B.weight", (rows, rank), scale * INIT_STD)]
    with CheckpointWriter(folder, [(n, torch_dtype, s) for n, s, _ in factors], prefix="adapter_model") as out:
        for name, shape, std in factors:
            out.write(name, (torch.randn(shape, generator=generator(seed, name)) * std).to(torch_dtype))
        out.write_json("adapter_config.json", {
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(targets),
            "use_rslora": use_rslora, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
            "modules_to_save": None, "base_model_name_or_path": str(Path(base_folder).resolve()),
            "task_type": "CAUSAL_LM"})
    return Path(folder)
