"""Tiny GGUF files written with the gguf package's writer, from a Hugging Face Llama folder (for the import tests),
and split into byte chunks as registry packages ship a large one."""

import json
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

from merging.io.hf_loading import load_causal_lm


def _llama_cpp_permute(weights, heads: int):
    """llama.cpp's convert script interleaves q/k rows for its rotary layout; transformers undoes it on import."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_llama_gguf(model_dir: Path, path: Path) -> Path:
    """A float32 GGUF of a Llama checkpoint folder with its byte-level BPE tokenizer, as llama.cpp lays it out."""
    model = load_causal_lm(model_dir)
    config = model.config
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{theirs}.weight", state[f"{layer}{ours}.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(state[f"{layer}self_attn.q_proj.weight"],
                                                                       config.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(state[f"{layer}self_attn.k_proj.weight"],
                                                                       config.num_key_value_heads))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_metadata_only_gguf(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("other")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tensors_gguf(path: Path, seed: int = 0) -> Path:
    """A GGUF of random tensors, float32, float16 and Q8_0 (blocks of 32 in 34 bytes), with no model behind it:
    for the byte-level checks of split files."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tensors")
    writer.add_token_list([f"t{i}" for i in range(50)])  # an array of strings, as tokenizers have
    writer.add_tensor("a.weight", rng.standard_normal((48, 64)).astype(np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((37,)).astype(np.float16))
    writer.add_tensor("c.weight", quantize(rng.standard_normal((16, 64)).astype(np.float32),
                                           gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def split_gguf(path: Path, folder: Path, count: int) -> list[Path]:
    """`path` cut into `count` byte chunks NAME.part00, .part01, ..., all of one size but the last."""
    data = path.read_bytes()
    size = -(-len(data) // count)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for index in range(count):
        part = folder / f"{path.name}.part{index:02d}"
        part.write_bytes(data[index * size : (index + 1) * size])
        parts.append(part)
    return parts
