"""mergeplan against mergekit on the same mergekit YAML: for every method both tools have, one YAML file is given
to `mergeplan merge` and to `mergekit-yaml`, and the two outputs are compared tensor by tensor.

Inputs are random float32 Llama checkpoints (the `tiny` size of bench/merge_speed.py, float32 so that trimming
has no ties at the threshold): a base and three experts (base + 0.1·noise), plus a second, unrelated random model
for SLERP at a wide angle. Computation and output
are float32. DARE and DELLA are left out: their random masks are each tool's own, so outputs cannot match.

    make bench-equality    # or: .venv/bin/python bench/mergekit_equality.py [--workdir DIR]

mergekit is LGPL; it is only run through its `mergekit-yaml` command, never imported. Nothing is asserted: the
table says per case the largest absolute difference and the share of entries that differ by more than 1e-5.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import yaml
from merge_speed import MERGEKIT_CLI, OURS_CLI, SIZES

from merging.io.checkpoint import CheckpointReader
from merging.io.synthetic import llama_config, write_random_base, write_random_expert

TOLERANCE = 1e-5
EXPERTS = 3


def ensure_inputs(workdir: Path) -> dict[str, Path]:
    config = llama_config(**SIZES["tiny"], tie_word_embeddings=False, dtype="float32")
    folders = {"base": workdir / "base", "other": workdir / "other",
               **{f"expert{i}": workdir / f"expert{i}" for i in range(EXPERTS)}}
    if not folders["base"].exists():
        write_random_base(folders["base"], config, seed=0)
        write_random_base(folders["other"], config, seed=1)
        for i in range(EXPERTS):
            write_random_expert(folders["base"], folders[f"expert{i}"], seed=i + 1, scale=0.1)
    return folders


def cases(folders: dict[str, Path]) -> dict[str, dict]:
    experts = [{"model": str(folders[f"expert{i}"]), "parameters": {"weight": w}}
               for i, w in zip(range(EXPERTS), (1.0, 0.5, 2.0), strict=True)]
    unweighted = [{"model": str(folders[f"expert{i}"])} for i in range(EXPERTS)]

    def task(method: str, parameters: dict, models: list[dict] = experts) -> dict:
        return {"merge_method": method, "base_model": str(folders["base"]), "models": models,
                "parameters": parameters, "dtype": "float32"}

    def slerp(first: str, second: str, t: float) -> dict:
        return {"merge_method": "slerp", "base_model": str(folders[first]), "parameters": {"t": t},
                "models": [{"model": str(folders[first])}, {"model": str(folders[second])}], "dtype": "float32"}

    return {
        "linear": {"merge_method": "linear", "models": [{"model": str(folders["base"]), "parameters": {"weight": 1.0}},
                                                       *experts], "dtype": "float32"},
        "task_arithmetic": task("task_arithmetic", {"lambda": 0.7}),
        "ties": task("ties", {"density": 0.4, "lambda": 0.9}),
        "breadcrumbs": task("breadcrumbs", {"density": 0.4, "gamma": 0.02, "lambda": 0.9}),
        "breadcrumbs_ties": task("breadcrumbs_ties", {"density": 0.4, "gamma": 0.02, "normalize": True}),
        "model_stock": task("model_stock", {}, unweighted),
        "model_stock filter_wise": task("model_stock", {"filter_wise": True}, unweighted),
        "slerp expert0 → expert1": slerp("expert0", "expert1", 0.3),
        "slerp base → other (at an angle)": slerp("base", "other", 0.3),
    }


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:2])} failed:\n{done.stderr[-2000:]}")


def compare(ours: Path, theirs: Path) -> tuple[float, float, int]:
    """(largest absolute difference, share of entries differing by more than TOLERANCE, tensors compared)."""
    mine, peer = CheckpointReader(ours), CheckpointReader(theirs)
    if set(mine.names()) != set(peer.names()):
        raise SystemExit(f"{ours} and {theirs} hold different tensors")
    largest, differing, total = 0.0, 0, 0
    for name in mine.names():
        a, b = mine.read(name).float(), peer.read(name).float()
        difference = (a - b).abs()
        largest = max(largest, float(difference.max()))
        differing += int((difference > TOLERANCE).sum())
        total += a.numel()
    return largest, differing / total, len(mine.names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench/out/mergekit_equality"))
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    folders = ensure_inputs(args.workdir)
    rows = ["| case | tensors | largest abs difference | entries differing > 1e-5 |", "|---|---|---|---|"]
    for name, config in cases(folders).items():
        slug = name.split(" (")[0].replace(" ", "_").replace("→", "to")
        path = args.workdir / f"{slug}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        ours, theirs = args.workdir / "out" / f"{slug}.mergeplan", args.workdir / "out" / f"{slug}.mergekit"
        run([str(OURS_CLI), "-q", "merge", str(path), str(ours), "--overwrite"])
        run([str(MERGEKIT_CLI), str(path), str(theirs), "--no-cuda", "--no-copy-tokenizer", "--no-write-model-card",
             "--quiet"])
        largest, share, tensors = compare(ours, theirs)
        rows.append(f"| {name} | {tensors} | {largest:.2e} | {share:.4%} |")
        print(rows[-1], flush=True)
    (args.workdir / "mergekit_equality.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
