"""The README.md of a merged checkpoint: a Hugging Face model card (YAML front matter, then markdown) with the
merge recipe, as mergekit writes one. Checkpoints are named by their folder names only: a card travels with the
model and should not disclose the folders of the machine that made it (merge_config.yaml, next to it, has the
full paths)."""

from __future__ import annotations

import yaml

from merging.config import MergeConfig

CARD_FILE = "README.md"
METHOD_SUMMARY = {
    "average": "the mean of the experts' task vectors added to the base",
    "task_arithmetic": "θ0 + λ Σ wi τi (Task Arithmetic, Ilharco et al. 2023)",
    "ties": "trim each task vector to its largest entries, elect a sign per entry, average the agreeing ones "
            "(TIES, Yadav et al. 2023)",
    "dare_linear": "drop entries at random and rescale by 1/density (DARE, Yu et al. 2024), then task arithmetic",
    "dare_ties": "DARE drop-and-rescale, then the TIES sign election and disjoint mean",
    "expert_merging": "layer-wise coefficients learned on unlabeled samples by aligning the merged model's "
                      "logits and hidden states with each expert (Expert Merging, Zhang et al. 2025)",
    "expert_merging_pp": "Expert Merging with chunk-wise coefficients allocated by importance (Expert Merging++)",
    "adamerging": "layer-wise coefficients learned on unlabeled samples by entropy minimisation (AdaMerging)",
}


def render_card(config: MergeConfig, extra: str = "") -> str:
    """The card for a merge of CONFIG; EXTRA is markdown appended by whoever knows more (lineage, scores)."""
    base = config.base.name
    front = {"base_model": base, "library_name": "transformers",
             "tags": ["mergeplan", "merge", config.method.replace("_", "-")]}
    experts = "\n".join(f"- `{e.path.name}`" + (f" as {e.name}" if e.name else "") + f", weight {e.weight:g}"
                        for e in config.experts)
    recipe = config.model_copy(update={
        "base": config.base.name, "experts": [e.model_copy(update={"path": e.path.name}) for e in config.experts],
        "calibration": {name: path.name for name, path in config.calibration.items()}}
    ).model_dump(mode="json", by_alias=True, exclude={"out"})
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---",
        f"# {config.method} merge of {len(config.experts)} experts of {base}",
        f"Merged with mergeplan, tensor by tensor, in float32, from the base checkpoint `{base}`.",
        f"## Method\n\n`{config.method}`: {METHOD_SUMMARY.get(config.method, config.method)}.",
        f"## Models merged\n\n{experts}",
        f"## Configuration\n\nThe recipe, with each checkpoint by its folder name (`mergeplan merge` reads it "
        "from the folder that holds them):\n\n```yaml\n"
        f"{yaml.safe_dump(recipe, sort_keys=False)}```",
    ]
    if extra:
        sections.append(extra.strip())
    return "\n\n".join(sections) + "\n"
