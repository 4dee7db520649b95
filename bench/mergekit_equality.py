"""mergeplan against mergekit on the same mergekit YAML: one case per method and per config field, plus configs
shaped like mergekit's own examples/ (hub ids replaced by local folders). Each YAML file is given to
`mergeplan merge` and to `mergekit-yaml`, and the two outputs are compared tensor by tensor.

Inputs are random float32 Llama checkpoints of 6 layers (float32 so that trimming has no ties at the threshold):
a base, three experts (base + 0.1·noise) and an unrelated random model (for SLERP at a wide angle). Computation
and output are float32. The random methods (DARE, DELLA) are run too: their masks are each tool's own draw, so
their rows say so instead of "equal".

    make bench-equality    # or: .venv/bin/python bench/mergekit_equality.py [--workdir DIR] [--only NAME]

mergekit is LGPL; it is only run through its `mergekit-yaml` command, never imported. tests/merging/
test_mergekit_equality.py (`make test-mergekit`) asserts the same cases.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import yaml

from merging.io.checkpoint import CheckpointReader
from merging.io.synthetic import llama_config, write_random_base, write_random_expert, write_random_lora

REPO = Path(__file__).resolve().parent.parent
OURS_CLI = REPO / ".venv" / "bin" / "mergeplan"
MERGEKIT_CLI = REPO / ".venv-bench" / "bin" / "mergekit-yaml"
TOLERANCE = 1e-5
EXPERTS = 3
LAYERS = 6
EQUAL = "equal"
RANDOM = "not equal by design: each tool draws its own random masks"


def ensure_inputs(workdir: Path) -> dict[str, Path]:
    config = llama_config(hidden_size=64, intermediate_size=176, num_hidden_layers=LAYERS, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, dtype="float32")
    folders = {"base": workdir / "base", "other": workdir / "other", "lora": workdir / "lora",
               **{f"expert{i}": workdir / f"expert{i}" for i in range(EXPERTS)}}
    if not folders["lora"].exists():
        write_random_base(folders["base"], config, seed=0)
        write_random_base(folders["other"], config, seed=1)
        for i in range(EXPERTS):
            write_random_expert(folders["base"], folders[f"expert{i}"], seed=i + 1, scale=0.1)
        write_random_lora(folders["base"], folders["lora"], seed=9, rank=4, scale=5.0)
    return folders


def cases(folders: dict[str, Path]) -> dict[str, tuple[dict, str]]:
    """Case name -> (mergekit config, what to expect)."""
    path = {name: str(folder) for name, folder in folders.items()}
    weighted = [{"model": path[f"expert{i}"], "parameters": {"weight": w}} for i, w in enumerate((1.0, 0.5, 2.0))]
    plain = [{"model": path[f"expert{i}"]} for i in range(EXPERTS)]

    def task(method: str, parameters: dict, models: list[dict] = weighted, **top) -> dict:
        return {"merge_method": method, "base_model": path["base"], "models": models, "parameters": parameters,
                "dtype": "float32", **top}

    def pair(method: str, first: str, second: str, parameters: dict, base: str | None = None) -> dict:
        config = {"merge_method": method, "parameters": parameters, "dtype": "float32",
                  "models": [{"model": path[first]}, {"model": path[second]}]}
        return config | ({"base_model": path[base]} if base else {})

    def source_slices(models: list[str], ranges: list[tuple[int, int]], parameters: list[dict]) -> list[dict]:
        return [{"sources": [{"model": path[m], "layer_range": list(r)} for m in models], "parameters": p}
                for r, p in zip(ranges, parameters, strict=True)]

    t_by_filter = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                         {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}
    return {
        # every method
        "linear": ({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": path["base"], "parameters": {"weight": 1.0}}, *weighted]}, EQUAL),
        "task_arithmetic": (task("task_arithmetic", {"lambda": 0.7}), EQUAL),
        "ties": (task("ties", {"density": 0.4, "lambda": 0.9}), EQUAL),
        "dare_linear": (task("dare_linear", {"density": 0.5}), RANDOM),
        "dare_ties": (task("dare_ties", {"density": 0.5}), RANDOM),
        "breadcrumbs": (task("breadcrumbs", {"density": 0.4, "gamma": 0.02, "lambda": 0.9}), EQUAL),
        "breadcrumbs_ties": (task("breadcrumbs_ties", {"density": 0.4, "gamma": 0.02}), EQUAL),
        "della": (task("della", {"density": 0.5, "epsilon": 0.1}), RANDOM),
        "della_linear": (task("della_linear", {"density": 0.5, "epsilon": 0.1}), RANDOM),
        "model_stock": (task("model_stock", {}, plain), EQUAL),
        "model_stock filter_wise": (task("model_stock", {"filter_wise": True}, plain), EQUAL),
        "slerp expert0 → expert1": (pair("slerp", "expert0", "expert1", {"t": 0.3}, base="expert0"), EQUAL),
        "slerp base → other (at an angle)": (pair("slerp", "base", "other", {"t": 0.3}, base="base"), EQUAL),
        "nuslerp (with base)": (task("nuslerp", {}, weighted[:2]), EQUAL),
        "nuslerp (two models, row-wise)": (pair("nuslerp", "expert0", "other", {"weight": 0.4,
                                                                                "nuslerp_row_wise": True}), EQUAL),
        "multislerp (with base)": (task("multislerp", {}), EQUAL),
        "multislerp (models only)": ({"merge_method": "multislerp", "dtype": "float32", "models": weighted}, EQUAL),
        "karcher": (task("karcher", {"max_iter": 5}, plain), EQUAL),
        "sce": (task("sce", {"select_topk": 0.3}, plain), EQUAL),
        "ram": (task("ram", {}, plain), EQUAL),
        "ramplus_tl": (task("ramplus_tl", {"r": 0.2}, plain), EQUAL),
        "nearswap": (task("nearswap", {"t": 0.001}, plain[:1]), EQUAL),
        "arcee_fusion": (task("arcee_fusion", {}, plain[:1]), EQUAL),
        # every field
        "ties normalize: false (sum of the elected)": (task("ties", {"density": 0.5, "normalize": False}), EQUAL),
        "ties rescale: true (L1)": (task("ties", {"density": 0.5, "rescale": True}), EQUAL),
        "breadcrumbs_ties normalize: true, rescale: true": (
            task("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05, "normalize": True, "rescale": True}), EQUAL),
        "ties density per model and a global default": (task("ties", {"density": 0.3}, [
            {"model": path["expert0"], "parameters": {"density": 0.8, "weight": 1.0}},
            {"model": path["expert1"], "parameters": {"weight": 1.0}},
            {"model": path["expert2"], "parameters": {"density": 0.5, "weight": 0.7}}]), EQUAL),
        "task_arithmetic weight gradient": (task("task_arithmetic", {}, [
            {"model": path["expert0"], "parameters": {"weight": [0.2, 0.8]}},
            {"model": path["expert1"], "parameters": {"weight": [1.0, 0.5, 0.0]}}]), EQUAL),
        "ties filters on density and lambda": (task("ties", {
            "density": [{"filter": "mlp", "value": 0.3}, {"filter": "self_attn", "value": [0.2, 0.9]},
                        {"value": 0.6}],
            "lambda": [{"filter": "embed", "value": 0.5}, {"value": 1.0}]}), EQUAL),
        "linear weight gradient (normalized per tensor)": ({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": path["expert0"], "parameters": {"weight": [1, 3]}},
            {"model": path["expert1"], "parameters": {"weight": [2, 0.5, 1]}}]}, EQUAL),
        "slices: two ranges, each its own parameters": ({
            "merge_method": "ties", "base_model": path["base"], "dtype": "float32",
            "slices": source_slices(["base", "expert0", "expert1"], [(0, 2), (2, 6)],
                                    [{"density": 0.2}, {"density": [0.9, 0.4]}]),
            "parameters": {"weight": 1.0}}, EQUAL),
        "model+lora (an adapter applied to an expert)": (task("task_arithmetic", {}, [
            {"model": f"{path['expert1']}+{path['lora']}", "parameters": {"weight": 0.5}},
            {"model": path["expert2"], "parameters": {"weight": 1.0}}]), EQUAL),
        # shaped like mergekit's examples/ (hub ids -> local folders)
        "examples/bio-merge.yml (ties, normalize: false, int8_mask)": (task("ties", {
            "normalize": False, "int8_mask": True}, [
            {"model": path[f"expert{i}"], "parameters": {"density": 0.5, "weight": 0.5}} for i in range(2)]), EQUAL),
        "examples/gradient-slerp.yml (slices, t by filter)": ({
            "merge_method": "slerp", "base_model": path["expert0"], "dtype": "float32", "parameters": t_by_filter,
            "slices": source_slices(["expert0", "expert1"], [(0, LAYERS)], [{}])}, EQUAL),
        "examples/gradient-slerp.yml (models: syntax)": ({
            "merge_method": "slerp", "base_model": path["expert0"], "dtype": "float32", "parameters": t_by_filter,
            "models": [{"model": path["expert0"]}, {"model": path["expert1"]}]}, EQUAL),
        "examples/linear.yml": ({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": path[f"expert{i}"], "parameters": {"weight": w}} for i, w in enumerate((1.0, 0.3, 0.5))]}, EQUAL),
        "examples/ties.yml (density and weight gradients, weight by filter)": (task("ties", {
            "normalize": True, "int8_mask": True}, [
            {"model": path["expert0"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": path["expert1"], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": path["expert2"], "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                                  {"value": 0}]}}]), EQUAL),
        "examples/arcee_fusion.yml": (pair("arcee_fusion", "expert0", "expert1", {}, base="expert0"), EQUAL),
        "examples/orcamini-platy-44layer.yml (passthrough, overlapping ranges)": ({
            "merge_method": "passthrough", "dtype": "float32", "slices": [
                {"sources": [{"model": path["expert0"], "layer_range": [0, 4]}]},
                {"sources": [{"model": path["expert1"], "layer_range": [2, LAYERS]}]}]}, EQUAL),
        "passthrough with scale by filter": ({
            "merge_method": "passthrough", "dtype": "float32", "slices": [
                {"sources": [{"model": path["expert0"], "layer_range": [0, 3]}]},
                {"sources": [{"model": path["expert0"], "layer_range": [2, 3], "parameters": {"scale": [
                    {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]}}]},
                {"sources": [{"model": path["expert2"], "layer_range": [3, LAYERS]}]}]}, EQUAL),
    }


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{done.stderr[-2000:]}")


def compare(ours: Path, theirs: Path) -> tuple[float, float, int]:
    """(largest absolute difference, share of entries differing by more than TOLERANCE, tensors compared)."""
    mine, peer = CheckpointReader(ours), CheckpointReader(theirs)
    if mine.config.get("num_hidden_layers") != peer.config.get("num_hidden_layers"):
        raise RuntimeError(f"{ours} has {mine.config.get('num_hidden_layers')} layers, {theirs} "
                           f"{peer.config.get('num_hidden_layers')}")
    if set(mine.names()) != set(peer.names()):
        raise RuntimeError(f"{ours} and {theirs} hold different tensors: "
                           f"{sorted(set(mine.names()) ^ set(peer.names()))[:4]}")
    largest, differing, total = 0.0, 0, 0
    for name in mine.names():
        a, b = mine.read(name).float(), peer.read(name).float()
        difference = (a - b).abs()
        largest = max(largest, float(difference.max()))
        differing += int((difference > TOLERANCE).sum())
        total += a.numel()
    return largest, differing / total, len(mine.names())


def run_case(workdir: Path, name: str, config: dict) -> tuple[float, float, int]:
    """Both tools on CONFIG; (largest difference, share differing, tensors)."""
    key = "".join(c if c.isalnum() else "_" for c in name)[:60]
    path = workdir / f"{key}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    ours, theirs = workdir / "out" / f"{key}.mergeplan", workdir / "out" / f"{key}.mergekit"
    run([str(OURS_CLI), "-q", "merge", str(path), str(ours), "--overwrite"])
    run([str(MERGEKIT_CLI), str(path), str(theirs), "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card",
         "--quiet", "--lora-merge-cache", str(workdir / "lora-merge-cache")])  # mergekit writes model+lora merged
    return compare(ours, theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/mergekit_equality"))
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    folders = ensure_inputs(args.workdir)
    rows = ["| case | tensors | largest abs difference | entries differing > 1e-5 | expected |",
            "|---|---|---|---|---|"]
    for name, (config, expected) in cases(folders).items():
        if args.only and args.only not in name:
            continue
        largest, share, tensors = run_case(args.workdir, name, config)
        rows.append(f"| {name} | {tensors} | {largest:.2e} | {share:.4%} | {expected} |")
        print(rows[-1], flush=True)
    (args.workdir / "mergekit_equality.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
