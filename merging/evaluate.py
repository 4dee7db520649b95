"""Held-out evaluation: token-weighted cross-entropy (nats) on response tokens, exact-match accuracy.

CE per domain is the sum of response-token losses over the sum of response tokens (prompts are masked);
`macro` is the mean over domains, `micro` the token-weighted mean. Accuracy decodes greedily from the prompt
and compares the final `Answer: X` line with the example's answer (synthetic domains only).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merging.data.example import Example
from merging.data.loading import IGNORE_INDEX, collate, data_domains, encode, load_split
from merging.errors import ConfigError
from merging.experts import declared_base, is_adapter, load_expert_model
from merging.io.hf_loading import check_causal_lm, load_tokenizer

ANSWER_LINE = re.compile(r"Answer:\s*(.+?)\s*$", re.MULTILINE)


@dataclass
class DomainScore:
    domain: str
    ce: float
    tokens: int
    examples: int
    accuracy: float | None = None
    accuracy_examples: int = 0


@dataclass
class EvalResult:
    model: str
    split: str
    domains: list[DomainScore] = field(default_factory=list)

    @property
    def macro_ce(self) -> float:
        return sum(d.ce for d in self.domains) / len(self.domains)

    @property
    def micro_ce(self) -> float:
        return sum(d.ce * d.tokens for d in self.domains) / sum(d.tokens for d in self.domains)

    def ce(self, domain: str) -> float:
        return next(d.ce for d in self.domains if d.domain == domain)

    def to_dict(self) -> dict:
        return {"model": self.model, "split": self.split, "macro_ce": self.macro_ce, "micro_ce": self.micro_ce,
                "domains": [asdict(d) for d in self.domains]}

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        """The inverse of to_dict (its derived macro and micro CE are recomputed, not read)."""
        return cls(data["model"], data["split"], [DomainScore(**d) for d in data["domains"]])


def load_for_evaluation(folder: str | Path, dtype: torch.dtype = torch.float32, base: str | Path | None = None):
    """A causal LM and its tokenizer from a checkpoint folder, or from a LoRA adapter folder applied to `base`
    (default: the local folder the adapter names); refuses what cannot be evaluated."""
    folder = Path(folder)
    model_folder = folder
    if is_adapter(folder):
        model_folder = Path(base) if base is not None else declared_base(folder)
        if model_folder is None:
            raise ConfigError(f"{folder}: a LoRA adapter is evaluated on its base: pass --base FOLDER")
    check_causal_lm(model_folder)
    tokenizer = load_tokenizer(model_folder)
    model = load_expert_model(folder, model_folder, dtype)
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"{folder}: the model's vocab_size is {model.config.vocab_size} but its tokenizer has "
                          f"{len(tokenizer)} tokens; use the tokenizer the model was trained with")
    model.eval()
    return model, tokenizer


@torch.no_grad()
def cross_entropy(model, tokenizer, examples: list[Example], batch_size: int, max_length: int) -> tuple[float, int]:
    """Summed response-token CE over all examples divided by their count of response tokens."""
    encoded = sorted((encode(tokenizer, e, max_length) for e in examples), key=lambda e: len(e.ids))
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(losses)
        tokens += int((labels != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ConfigError("no response tokens to evaluate: every example was truncated away or empty")
    return total / tokens, tokens


def extract_answer(text: str) -> str | None:
    matches = ANSWER_LINE.findall(text)
    return matches[-1] if matches else None


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int) -> float:
    """Share of examples whose greedy continuation ends in their exact `Answer:`."""
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [[tokenizer.bos_token_id, *tokenizer.encode(e.prompt, add_special_tokens=False)] for e in batch]
        padded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        room = model.config.max_position_embeddings - padded["input_ids"].shape[1]
        generated = model.generate(**padded, max_new_tokens=min(max_new_tokens, room), do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(generated[:, padded["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(extract_answer(text) == e.answer for text, e in zip(texts, batch, strict=True))
    return correct / len(examples)


def evaluate(model_dir: str | Path, data_dir: str | Path, domains: list[str] | None = None, split: str = "eval",
             batch_size: int = 32, dtype: str = "float32", accuracy_samples: int = 0,
             max_examples: int | None = None, base: str | Path | None = None) -> EvalResult:
    """CE per domain on a split of a data folder; accuracy on the first `accuracy_samples` answered examples.
    `base`: the base model of a LoRA adapter `model_dir`."""
    model, tokenizer = load_for_evaluation(model_dir, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype],
                                           base)
    max_length = model.config.max_position_embeddings
    result = EvalResult(str(model_dir), split)
    for domain in domains or data_domains(data_dir):
        examples = load_split(data_dir, domain, split)[:max_examples]
        ce, tokens = cross_entropy(model, tokenizer, examples, batch_size, max_length)
        score = DomainScore(domain, ce, tokens, len(examples))
        answered = [e for e in examples if e.answer is not None][:accuracy_samples]
        if answered:
            longest = max(len(tokenizer.encode(e.response, add_special_tokens=False)) for e in answered)
            score.accuracy = exact_match(model, tokenizer, answered, batch_size, longest + 8)
            score.accuracy_examples = len(answered)
        result.domains.append(score)
    return result
