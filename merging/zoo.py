"""The expert zoo: a tokenizer, a base model, one expert per domain and a multitask "mixture", built here.

Everything is deterministic (seeded) and local: data from merging/data, a byte-level BPE trained with
`tokenizers`, LlamaForCausalLM models from a config, trained on the CPU. A model whose recipe (settings,
data and parent) is unchanged is reused on a second build; manifest.json records every setting, seed and
sha256. Layout of a zoo folder:

    manifest.json  tokenizer/  data/DOMAIN/{train,calib,eval}.jsonl
    base/  experts/DOMAIN/  mixture/                 (presets with one base size)
    SIZE/base/  SIZE/experts/DOMAIN/  SIZE/mixture/  (presets with several base sizes, e.g. `sizes`)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from merging.checkpoint import staged_folder
from merging.data.domains import DOMAINS
from merging.data.example import Example, write_jsonl
from merging.data.loading import SPLITS, encode, load_split
from merging.data.sources import domain_splits
from merging.errors import ConfigError
from merging.hf import load_causal_lm, load_tokenizer
from merging.training import TrainSettings, train

log = logging.getLogger("mergeplan")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
RECIPE_FILE = "zoo_recipe.json"


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


class ZooPreset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    vocab_size: int
    max_length: int
    sizes: tuple[ModelSize, ...]
    domains: tuple[str, ...] = DOMAINS
    split_sizes: dict[str, int]
    base: Phase
    expert: Phase
    seed: int = 0

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECIPE_FILE}


def expert_folders(zoo_dir: Path) -> list[Path]:
    """The expert checkpoints of a one-size zoo, sorted by domain."""
    return sorted(p for p in (zoo_dir / "experts").iterdir() if p.is_dir())


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _reusable(folder: Path, key: str) -> bool:
    recipe = folder / RECIPE_FILE
    return recipe.is_file() and json.loads(recipe.read_text()).get("key") == key


@contextmanager
def _staged(folder: Path, record: dict) -> Iterator[Path]:
    """staged_folder, with the recipe record written last: a folder with a recipe is complete."""
    with staged_folder(folder, overwrite=True) as staging:
        yield staging
        (staging / RECIPE_FILE).write_text(json.dumps(record))


def build_data(out: Path, preset: ZooPreset, user_data: Path | None) -> dict[str, dict[str, str]]:
    """Write each domain's splits (rewritten only when their content changes); returns {domain: {file: sha256}}.
    A real-text domain whose source is absent here is left out, with a notice."""
    hashes = {}
    for domain in preset.domains:
        splits = domain_splits(domain, preset.split_sizes, preset.seed, 2 * preset.max_length, user_data)
        if not splits:
            continue
        folder = out / "data" / domain
        key = recipe_key({split: [e.to_json() for e in examples] for split, examples in splits.items()})
        if not _reusable(folder, key):
            with _staged(folder, {"key": key}) as staging:
                for split, examples in splits.items():
                    write_jsonl(staging / f"{split}.jsonl", examples)
        hashes[domain] = folder_hashes(folder)
    if not hashes:
        raise ConfigError("no domain has data; name synthetic domains or give --data")
    return hashes


def build_tokenizer(out: Path, preset: ZooPreset, training_text: list[str]):
    """A byte-level BPE trained on the training splits, saved so that AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = out / "tokenizer"
    text_hash = hashlib.sha256("\n".join(training_text).encode()).hexdigest()
    key = recipe_key({"vocab": preset.vocab_size, "text": text_hash})
    if not _reusable(folder, key):
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=preset.vocab_size, show_progress=False,
                                      special_tokens=list(SPECIAL_TOKENS.values()),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(training_text, trainer=trainer)
        with _staged(folder, {"key": key}) as staging:
            PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS).save_pretrained(staging)
    return load_tokenizer(folder)


def new_model(size: ModelSize, tokenizer, max_length: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers, num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads, max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _train_and_save(folder: Path, recipe: dict, make_model, examples: list[Example], tokenizer,
                    phase: Phase, all_tokens: bool, preset: ZooPreset, seed: int) -> dict:
    """Train a model unless its recipe is unchanged; returns its manifest entry."""
    key = recipe_key(recipe)
    if not _reusable(folder, key):
        started = time.perf_counter()
        model = make_model()
        encoded = [encode(tokenizer, e, preset.max_length) for e in examples]
        settings = TrainSettings(steps=phase.steps, batch_size=phase.batch_size, lr=phase.lr,
                                 warmup_steps=phase.warmup_steps, all_tokens=all_tokens)
        losses = train(model, encoded, settings, tokenizer.pad_token_id, seed, label=str(folder))
        summary = {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
                   "seconds": round(time.perf_counter() - started, 2), "parameters": model.num_parameters()}
        with _staged(folder, {"key": key, "recipe": recipe, "training": summary}) as staging:
            model.save_pretrained(staging)  # safetensors
            tokenizer.save_pretrained(staging)
        log.info("trained %s: loss %.3f -> %.3f in %.1f s", folder, summary["first_loss"], summary["last_loss"],
                 summary["seconds"])
    saved = json.loads((folder / RECIPE_FILE).read_text())
    return {"recipe_key": key, "training": saved["training"], "sha256": folder_hashes(folder)}


def build_family(root: Path, out: Path, preset: ZooPreset, size: ModelSize, tokenizer, data_hashes: dict) -> dict:
    """The base of one size, its experts and its mixture model, in `out` (data and tokenizer in `root`)."""
    train_sets = {d: load_split(root / "data", d, "train") for d in preset.domains}
    everything = [e for d in preset.domains for e in train_sets[d]]
    common = {"size": size.model_dump(), "vocab": len(tokenizer), "max_length": preset.max_length,
              "seed": preset.seed, "tokenizer": folder_hashes(root / "tokenizer")["tokenizer.json"]}
    base_recipe = common | {"phase": preset.base.model_dump(), "data": data_hashes, "role": "base"}
    entries = {"base": _train_and_save(
        out / "base", base_recipe, lambda: new_model(size, tokenizer, preset.max_length, preset.seed),
        everything, tokenizer, preset.base, True, preset, preset.seed)}
    base_key = entries["base"]["recipe_key"]
    for index, domain in enumerate(preset.domains, start=1):
        recipe = common | {"phase": preset.expert.model_dump(), "data": data_hashes[domain], "parent": base_key,
                           "role": f"expert:{domain}"}
        entries[f"experts/{domain}"] = _train_and_save(
            out / "experts" / domain, recipe, lambda: load_causal_lm(out / "base"), train_sets[domain], tokenizer,
            preset.expert, False, preset, preset.seed + index)
    mixture_recipe = common | {"phase": preset.mixture.model_dump(), "data": data_hashes, "parent": base_key,
                               "role": "mixture"}
    entries["mixture"] = _train_and_save(
        out / "mixture", mixture_recipe, lambda: load_causal_lm(out / "base"), everything, tokenizer, preset.mixture,
        False, preset, preset.seed + len(preset.domains) + 1)
    return entries


def build_zoo(preset: ZooPreset | str, out: str | Path, domains: list[str] | None = None,
              user_data: str | Path | None = None) -> Path:
    """Build (or complete) a zoo in `out`; returns the path of its manifest.

    `domains` replaces the preset's nine synthetic domains (synthetic, real-text, or folders of `user_data`).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if domains:
        preset = preset.model_copy(update={"domains": tuple(domains)})
    out = Path(out)
    started = time.perf_counter()
    data_hashes = build_data(out, preset, Path(user_data) if user_data else None)
    preset = preset.model_copy(update={"domains": tuple(data_hashes)})
    training_text = [e.prompt + e.response for d in preset.domains for e in load_split(out / "data", d, "train")]
    tokenizer = build_tokenizer(out, preset, training_text)
    models = {}
    for size in preset.sizes:
        family = out if len(preset.sizes) == 1 else out / size.name
        entries = build_family(out, family, preset, size, tokenizer, data_hashes)
        prefix = "" if len(preset.sizes) == 1 else f"{size.name}/"
        models |= {prefix + name: entry for name, entry in entries.items()}
    manifest = {"preset": preset.model_dump(), "domains": list(preset.domains), "splits": list(SPLITS),
                "data": data_hashes, "tokenizer": folder_hashes(out / "tokenizer"), "models": models,
                "training_seconds": round(sum(m["training"]["seconds"] for m in models.values()), 1),
                "last_build_seconds": round(time.perf_counter() - started, 2)}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
