"""Benchmark: evaluation throughput (response tokens per second) and peak RSS, float32 vs bfloat16.

Each dtype runs in its own child process (so that its peak RSS is its own), `--repeats` times over the
held-out split of every domain of a zoo; medians are printed with the bfloat16 / float32 ratios.

    .venv/bin/python bench/eval_speed.py --zoo zoo-s          # a `small` zoo (mergeplan zoo build --preset small)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from merging.data.loading import data_domains, load_split
from merging.evaluate import cross_entropy, load_for_evaluation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure(zoo: Path, model: str, dtype: str, repeats: int, batch_size: int) -> dict:
    loaded, tokenizer = load_for_evaluation(zoo / model, DTYPES[dtype])
    examples = [e for d in data_domains(zoo / "data") for e in load_split(zoo / "data", d, "eval")]
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        _, tokens = cross_entropy(loaded, tokenizer, examples, batch_size, loaded.config.max_position_embeddings)
        rates.append(tokens / (time.perf_counter() - started))
    return {"tokens_per_second": statistics.median(rates), "tokens": tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--model", default="base", help="model folder inside the zoo (default base)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", choices=list(DTYPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.zoo, args.model, args.child, args.repeats, args.batch_size)))
        return 0
    results = {}
    for dtype in DTYPES:
        command = [sys.executable, __file__, "--zoo", str(args.zoo), "--model", args.model, "--repeats",
                   str(args.repeats), "--batch-size", str(args.batch_size), "--child", dtype]
        results[dtype] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    print(f"evaluation of {args.zoo / args.model} on every domain's eval split "
          f"({results['float32']['tokens']} response tokens), medians of {args.repeats}, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| dtype | tokens/s | peak RSS MB |\n|---|---|---|")
    for dtype, result in results.items():
        print(f"| {dtype} | {result['tokens_per_second']:.0f} | {result['peak_rss_mb']:.0f} |")
    speed = results["bfloat16"]["tokens_per_second"] / results["float32"]["tokens_per_second"]
    memory = results["bfloat16"]["peak_rss_mb"] / results["float32"]["peak_rss_mb"]
    print(f"\nbfloat16 / float32: speed x{speed:.2f}, peak RSS x{memory:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
