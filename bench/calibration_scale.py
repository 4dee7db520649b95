"""Calibration at scale: time and memory of Expert Merging with factored, streamed and resident task vectors.

Sections (--sections; each runs alone and resumes: a run whose runs/RUN.json exists is skipped, delete it to redo):
  real      the real zoo, EM and EM++ at bench/README.md's real-zoo protocol (ᾱ 0.1, 2 epochs, γ 0),
            task_vectors=auto over --seeds and resident (dense) over --dense-seeds; held-out macro CE (20 per domain)
  llama1b   a random 0.92B Llama (hidden 2048, 16 layers, 5632, 32/8 heads, the zoo tokenizer's vocab 49152,
            untied lm_head; stored in --dtype, float32 compute on the CPU), 9 random rank-16 adapters on all 7
            linears; expert_merging, 1 epoch, 8 samples × --tokens tokens per expert, grad_accumulation 8
  streamed  that base with 3 full experts (base + N(0, 0.1·0.02) on every tensor): task_vectors=streamed, and
            resident when MemAvailable allows; on the CPU the device is the host
  account   merging.calibration.memory.account against every run above; its prediction for Mistral-7B shapes
  warm      a ninth expert joins a calibrated head of eight: warm (--warm-epochs) against cold (the real run)
(the GPU check, 7B shapes in bf16: bench/calibration_gpu7b.py)
Each calibration is a `mergeplan merge` in its own process: peak RSS = the child's VmHWM, polled
(merge_speed.run_child); seconds and memory parts (every numeric *_mb key) from its calibration.json.
Out: bench/out/calibration_scale/SECTION/runs/RUN.json and SECTION.md (date, command, table; also printed).

    .venv/bin/python bench/calibration_scale.py --sections real
    .venv/bin/python bench/calibration_scale.py --sections llama1b,streamed,account
    .venv/bin/python bench/calibration_scale.py --sections llama1b --tiny --tokens 64   # plumbing, about 2 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from merge_speed import run_child  # bench/ is sys.path[0] when this file runs as a script
from merging_quality import Bench

from merging.data.loading import data_domains, load_split
from merging.experts import is_adapter
from merging.io.hf_loading import load_tokenizer
from merging.io.synthetic import LORA_TARGETS, llama_config, write_random_base, write_random_expert, write_random_lora

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "calibration_scale"
CLI = Path(sys.executable).with_name("mergeplan")
REAL_PARAMS = {"init": 0.1, "epochs": 2, "gamma": 0.0}  # bench/README.md, "Merging quality on the real zoo"
SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
          "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)}
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000)
RANK, SAMPLES, FULL_EXPERTS = 16, 8, 3


# ---------------------------------------------------------------- runs, reports, tables


def calibrate_in_child(run_file: Path, config: dict, account: dict, evaluate=None) -> dict | None:
    """One calibrated merge in its own process and its row (`evaluate(model folder)` adds to it, before the
    merged model is deleted), written to run_file; None when the child failed (the run is retried next time)."""
    work = run_file.parent.parent / "work" / run_file.stem
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config, indent=2))
    try:
        child = run_child([str(CLI), "merge", str(work / "config.json"), str(work / "model"), "--overwrite"],
                          work / "log.txt")
    except RuntimeError as exc:
        print(f"  {run_file.stem}: FAILED ({exc})", flush=True)
        return None
    report = json.loads((work / "model" / "calibration.json").read_text())
    steps = sum(len(stage["steps"]) for stage in report["stages"])
    samples = sum(report["samples"].values())
    numeric = {k: v for k, v in report.items() if k.endswith("_mb") and isinstance(v, int | float)}
    row = {"run": run_file.stem, "child_peak_rss_mb": round(child.peak_rss_mb, 1),
           "child_peak_anon_mb": child.peak_anon_mb and round(child.peak_anon_mb, 1),
           "merge_seconds": round(child.seconds, 1), "calibration_seconds": report["seconds"],
           "optimizer_steps": steps, "step_seconds": sum(s["seconds"] for s in report["stages"]) / max(steps, 1),
           "device": report["device"], "dtype": report["dtype"], "samples": samples,
           "tokens_per_sample": math.ceil(report["sample_tokens"] / samples),
           "layout": report.get("layout", config["params"].get("task_vectors")), "teachers": report.get("teachers"),
           "report_peak_mb": numeric.pop("peak_memory_mb"), "peak_memory_kind": report.get("peak_memory_kind"),
           "parts_mb": numeric, "report_predicted_mb": report.get("predicted_mb"),
           "account": {**account, "samples": samples, "sample_tokens": report["sample_tokens"],
                       "max_tokens": report.get("max_sample_tokens"),  # the mean stands in when absent
                       "hidden_layers": len(report["hidden_layers"]) if isinstance(report["hidden_layers"], list)
                       else 0, "dtype_bytes": 2 if report["dtype"] in ("bfloat16", "float16") else 4}}
    if evaluate is not None:
        row.update(evaluate(work / "model"))
    shutil.rmtree(work / "model")  # the merged checkpoint; the row has what the bench needs
    save(run_file, row)
    return row


def account_inputs(base: Path, experts: list[Path]) -> dict:
    """The shapes a memory account needs about a run; calibrate_in_child adds what its report says."""
    adapters = []
    for folder in experts:
        if is_adapter(folder):
            adapter = json.loads((folder / "adapter_config.json").read_text())
            adapters.append([adapter["r"], sorted(adapter["target_modules"])])
    return {"model_config": json.loads((base / "config.json").read_text()), "adapters": adapters,
            "full_experts": len(experts) - len(adapters)}


def save(run_file: Path, row: dict) -> None:
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(row, indent=2) + "\n")


def load_rows(section: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((OUT / section / "runs").glob("*.json"))]


def parts_text(parts: list[dict]) -> str:
    """Median of each memory part over runs, as `name MB` pairs (whatever *_mb keys the reports have)."""
    keys = sorted({k for p in parts for k in p})
    return ", ".join(f"{k.removesuffix('_mb')} {num(statistics.median(p[k] for p in parts if k in p))}"
                     for k in keys)


def num(mb: float | None) -> str:
    if mb is None:
        return ""
    return f"{mb:.0f}" if abs(mb) >= 100 or mb == 0 else f"{mb:.1f}" if abs(mb) >= 1 else f"{mb:.2f}"


def write_table(section: str, header: list[str], rows: list[list], note: str = "") -> None:
    lines = [f"Date: {datetime.date.today()}. Command: `{shlex.join(['python', *sys.argv])}`. "
             f"{note}".rstrip(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    (OUT / f"{section}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- real zoo


def held_out(bench: Bench, model: Path) -> dict:
    result = bench.evaluate(model, accuracy=False)
    return {"macro_ce": result.macro_ce, "eval": result.to_dict()}


def section_real(args) -> None:
    bench = Bench(args.zoo, OUT / "real", accuracy_samples=0, max_examples=args.max_examples, tune_examples=None)
    for method in args.methods.split(","):
        for layout, seeds in (("auto", args.seeds), ("resident", args.dense_seeds)):
            for seed in seeds:
                run_file = OUT / "real" / "runs" / f"{method}-{layout}-{seed}.json"
                if run_file.exists():
                    continue
                # the dense reference as the code before factoring ran it: each teacher's outputs cached once
                teachers = {"teachers": "cached"} if layout == "resident" else {}
                config = bench.config(method, {**REAL_PARAMS, "task_vectors": layout, **teachers}, seed)
                row = calibrate_in_child(run_file, config.model_dump(mode="json", exclude_defaults=True),
                                         account_inputs(config.base, bench.experts),
                                         lambda model: held_out(bench, model))
                if row is not None:
                    print(f"  {run_file.stem}: {row['calibration_seconds']:.0f} s, peak RSS "
                          f"{row['child_peak_rss_mb']:.0f} MB, macro CE {row['macro_ce']:.4f}", flush=True)
    table = []
    for method in args.methods.split(","):
        for layout in ("auto", "resident"):
            rows = [r for r in load_rows("real") if r["run"].startswith(f"{method}-{layout}-")]
            if rows:
                chosen, ce = ",".join(sorted({str(r["layout"]) for r in rows})), [r["macro_ce"] for r in rows]
                table.append([method, f"{layout} ({chosen})", ",".join(r["run"].rsplit("-", 1)[1] for r in rows),
                              f"{statistics.median(r['calibration_seconds'] for r in rows):.0f}",
                              f"{statistics.median(r['child_peak_rss_mb'] for r in rows):.0f}",
                              f"{statistics.mean(ce):.4f} ± {statistics.stdev(ce) if len(ce) > 1 else 0:.4f}",
                              parts_text([r["parts_mb"] for r in rows])])
    write_table("real", ["method", "task vectors (chosen)", "seeds", "calibration s (median)", "peak RSS MB (median)",
                         "held-out macro CE", "memory parts MB (median)"], table,
                f"Real zoo, ᾱ 0.1, 2 epochs, γ 0, {args.max_examples} eval examples per domain.")


def section_warm(args) -> None:
    """A ninth expert joins a calibrated head of eight (the real zoo, seed 0): warm, from the head's coefficients
    for --warm-epochs, against the cold calibration of all nine (the `real` section's auto run, same method/seed)."""
    bench = Bench(args.zoo, OUT / "warm", accuracy_samples=0, max_examples=args.max_examples, tune_examples=None)
    method, head_coefficients = args.warm_method, OUT / "warm" / "head-coefficients.json"
    head_run, warm_run = (OUT / "warm" / "runs" / f"{method}-{name}.json"
                          for name in ("head8", f"warm9-{args.warm_epochs}epochs"))
    full = bench.config(method, REAL_PARAMS, 0)
    if not head_run.exists():
        head = full.model_copy(update={"experts": full.experts[:-1], "calibration": {
            d: path for d, path in full.calibration.items() if d != bench.domains[-1]}})

        def keep(model: Path) -> dict:
            shutil.copy(model / "coefficients.json", head_coefficients)
            return {}

        calibrate_in_child(head_run, head.model_dump(mode="json", exclude_defaults=True),
                           account_inputs(full.base, bench.experts[:-1]), keep)
    if not warm_run.exists():
        warm = bench.config(method, {**REAL_PARAMS, "epochs": args.warm_epochs,
                                     "warm_start": str(head_coefficients)}, 0)
        calibrate_in_child(warm_run, warm.model_dump(mode="json", exclude_defaults=True),
                           account_inputs(full.base, bench.experts), lambda model: held_out(bench, model))
    cold_run = OUT / "real" / "runs" / f"{method}-auto-0.json"
    if not (warm_run.exists() and cold_run.exists()):
        print(f"  warm: needs {warm_run} and {cold_run} (run --sections real first)")
        return
    cold = json.loads(cold_run.read_text())
    table = [[method, f"cold, all nine, {REAL_PARAMS['epochs']} epochs", f"{cold['calibration_seconds']:.0f}",
              f"{cold['macro_ce']:.4f}", ""]]
    for run in sorted((OUT / "warm" / "runs").glob(f"{method}-warm9-*.json")):
        warm = json.loads(run.read_text())
        table.append([method, f"warm from eight, {run.stem.rsplit('-', 1)[1]}", f"{warm['calibration_seconds']:.0f}",
                      f"{warm['macro_ce']:.4f}",
                      f"{1 - warm['calibration_seconds'] / cold['calibration_seconds']:.0%} of the time saved, "
                      f"CE {warm['macro_ce'] - cold['macro_ce']:+.4f}"])
    write_table("warm", ["method", "calibration", "seconds", "held-out macro CE", "against cold"], table,
                f"Real zoo, seed 0, ᾱ 0.1, γ 0; the ninth expert is {bench.domains[-1]}.")


# ---------------------------------------------------------------- random 1B base, adapters, full experts, data


def atomically(folder: Path, write) -> Path:
    """write(tmp) then rename: a folder that exists is complete (reused by later runs)."""
    if not folder.exists():
        print(f"writing {folder}", flush=True)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.rename(folder)
    return folder


def ensure_base(args) -> tuple[Path, dict[str, Path]]:
    """The random base (tokenizer copied from the zoo's base) and one calibration jsonl per zoo domain."""
    root = OUT / ("llama1b-tiny" if args.tiny else "llama1b")
    vocab = json.loads((args.zoo / "base" / "config.json").read_text())["vocab_size"]
    config = llama_config(**SHAPES["tiny" if args.tiny else "1b"], vocab_size=vocab, dtype=args.dtype)

    def write(folder: Path) -> None:
        write_random_base(folder, config, seed=0, max_shard_size=2_000_000_000)
        for file in (args.zoo / "base").glob("*"):
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(file, folder / file.name)

    base = atomically(root / "base", write)
    if json.loads((base / "config.json").read_text()) != config:
        sys.exit(f"{base} holds another config; delete {root} to rebuild it")
    tokenizer = load_tokenizer(base)
    data = {}
    for domain in data_domains(args.zoo / "data")[:args.experts]:
        data[domain] = root / "data" / f"{domain}-{args.tokens}.jsonl"
        if not data[domain].exists():
            data[domain].parent.mkdir(parents=True, exist_ok=True)
            data[domain].write_text("".join(json.dumps({"text": text}) + "\n"
                                            for text in long_texts(args.zoo, domain, tokenizer, args.tokens)))
    return base, data


def long_texts(zoo: Path, domain: str, tokenizer, tokens: int) -> list[str]:
    """SAMPLES texts of `tokens` tokens each (before BOS/EOS): the domain's train examples concatenated in file
    order, cut at `tokens` and decoded."""
    ids = [i for e in load_split(zoo / "data", domain, "train")
           for i in tokenizer.encode(f"{e.prompt}\n{e.response}\n\n", add_special_tokens=False)]
    if len(ids) < SAMPLES * tokens:
        sys.exit(f"{zoo}/data/{domain}: {len(ids)} train tokens, fewer than {SAMPLES} × {tokens}")
    return [tokenizer.decode(ids[i * tokens:(i + 1) * tokens]) for i in range(SAMPLES)]


def em_config(base: Path, experts: dict[str, Path], data: dict[str, Path], layout: str, samples: int) -> dict:
    params = {"epochs": 1, "grad_accumulation": 8, "samples_per_expert": samples, "task_vectors": layout}
    return {"base": str(base), "experts": [{"path": str(p), "name": n} for n, p in experts.items()],
            "method": "expert_merging", "params": params, "seed": 0,
            "calibration": {name: str(data[name]) for name in experts}}


def scale_runs(section: str, base: Path, experts: dict[str, Path], data: dict[str, Path], layouts: list[str],
               tokens: int, samples: int) -> None:
    for layout in layouts:
        run_file = OUT / section / "runs" / f"{base.parent.name}-{layout}-{len(experts)}x{samples}x{tokens}.json"
        if not run_file.exists():
            row = calibrate_in_child(run_file, em_config(base, experts, data, layout, samples),
                                     account_inputs(base, list(experts.values())))
            if row is not None:
                print(f"  {run_file.stem}: {row['calibration_seconds']:.0f} s, {row['step_seconds']:.1f} s/step, "
                      f"peak RSS {row['child_peak_rss_mb']:.0f} MB", flush=True)
    table = [[r["run"], r["device"], r["dtype"], r["samples"], r["tokens_per_sample"], r["calibration_seconds"],
              r["optimizer_steps"], f"{r['step_seconds']:.1f}", f"{r['child_peak_rss_mb']:.0f}",
              parts_text([r["parts_mb"]])] for r in load_rows(section)]
    write_table(section, ["run", "device", "compute dtype", "samples", "tokens/sample", "calibration s",
                          "optimizer steps", "s/step", "peak RSS MB", "memory parts MB"], table,
                "2 CPU cores; on the CPU the device is the host, so peak RSS is the device peak.")


def section_llama1b(args) -> None:
    base, data = ensure_base(args)
    experts = {domain: atomically(base.parent / "adapters" / domain,
                                  lambda tmp, i=i: write_random_lora(base, tmp, seed=i + 1, rank=RANK, alpha=2 * RANK))
               for i, domain in enumerate(data)}
    scale_runs("llama1b", base, experts, data, [args.layout], args.tokens, args.samples)


def section_streamed(args) -> None:
    import torch

    from merging.calibration.memory import available_mb

    base, data = ensure_base(args)
    domains = list(data)[:FULL_EXPERTS]
    experts = {domain: atomically(base.parent / "full" / domain,
                                  lambda tmp, i=i: write_random_expert(base, tmp, seed=100 + i, scale=0.1,
                                                                       max_shard_size=2_000_000_000))
               for i, domain in enumerate(domains)}
    layouts = args.streamed_layouts.split(",")
    if "resident" in layouts:  # K dense float32 task vectors of the linears + the float32 base + 2 GB headroom
        c = json.loads((base / "config.json").read_text())
        need = (FULL_EXPERTS * sum(a * b for a, b in linear_shapes(c)) + total_params(c)) * 4 / 2**20 + 2048
        available = available_mb(torch.device("cpu"))
        run = f"{base.parent.name}-resident-{len(experts)}x{args.samples}x{args.tokens}"
        done = OUT / "streamed" / "runs" / f"{run}.json"
        if available < need and not done.exists():
            print(f"  resident skipped: needs about {need:.0f} MB, {available:.0f} MB available", flush=True)
            layouts.remove("resident")
    scale_runs("streamed", base, experts, data, layouts, args.tokens, args.samples)


def linear_shapes(c: dict) -> list[tuple[int, int]]:
    """(out, in) of every q, k, v, o, gate, up, down projection of a Llama config.json."""
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    h, i = c["hidden_size"], c["intermediate_size"]
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)] * c["num_hidden_layers"]


def total_params(c: dict) -> int:  # the norms left out
    embeddings = c["vocab_size"] * c["hidden_size"] * (1 if c["tie_word_embeddings"] else 2)
    return sum(a * b for a, b in linear_shapes(c)) + embeddings


# ---------------------------------------------------------------- memory account


def predict_mb(model_config: dict, adapters: list, full_experts: int, tokens: int, dtype_bytes: int,
               layout: str, cached_tokens: int = 0, hidden_layers: int = 1, top_k: int | None = None,
               ) -> dict[str, float]:
    """merging.calibration.memory.account (MB per part) from a config.json and the experts: the one place to adapt
    when its signature changes. layout: resident (every expert dense), factored (adapters as factors, full experts
    dense) or streamed (adapters as factors, full experts read per tensor); cached_tokens: teacher-cache tokens
    (top_k: the tokens kept per position)."""
    from merging.calibration.memory import ModelShape, account, teacher_cache_bytes

    c, linears = model_config, linear_shapes(model_config)
    shape = ModelShape(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                       c["vocab_size"], total_params(c))
    experts = len(adapters) + full_experts
    return account(shape, dtype_bytes=dtype_bytes, tokens=tokens,
                   adapter_ranks=[] if layout == "resident" else [rank for rank, _ in adapters],
                   linear_numel=sum(a * b for a, b in linears), linear_rows_and_columns=sum(a + b for a, b in linears),
                   largest_linear=max(a * b for a, b in linears),
                   dense_experts={"resident": experts, "factored": full_experts}.get(layout, 0),
                   streamed_experts=full_experts if layout == "streamed" else 0,
                   teacher_cache=teacher_cache_bytes(shape, cached_tokens, hidden_layers, dtype_bytes, top_k),
                   eager_attention=False)


def interpreter_mb() -> float:
    """Peak RSS of a child that only imports what a calibration imports: the part no account predicts."""
    file = OUT / "account" / "interpreter.json"
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        child = run_child([sys.executable, "-c", "import torch, transformers, merging.calibration.calibrate"],
                          file.with_suffix(".log"))
        save(file, {"peak_rss_mb": child.peak_rss_mb})
    return json.loads(file.read_text())["peak_rss_mb"]


def section_account(args) -> None:
    table, interpreter = [], interpreter_mb()
    for section in ("real", "llama1b", "streamed"):
        for row in load_rows(section):
            facts = row["account"]
            predicted = predict_mb(facts["model_config"], facts["adapters"], facts["full_experts"],
                                   facts["max_tokens"] or math.ceil(facts["sample_tokens"] / facts["samples"]),
                                   facts["dtype_bytes"], row["layout"],
                                   facts["sample_tokens"] if row["teachers"] in ("cached", "top_k") else 0,
                                   facts["hidden_layers"], 64 if row["teachers"] == "top_k" else None)
            measured = row["parts_mb"]
            parts = ", ".join(f"{p.removesuffix('_mb')} {num(predicted.get(p, math.nan))}/"
                              f"{num(measured.get(p, math.nan))}" for p in sorted(set(predicted) | set(measured)))
            total, own = sum(predicted.values()), (row["report_predicted_mb"] or {}).get(row["layout"])
            measured_total = row["child_peak_rss_mb"] - interpreter
            table.append([section, row["run"], row["layout"], f"{total:.0f}",
                          "" if own is None else f"{sum(own.values()):.0f}", f"{measured_total:.0f}",
                          f"{total / measured_total:.2f}", parts])
    for layout in ("factored", "resident"):
        config = llama_config(**MISTRAL_7B, dtype="bfloat16")
        predicted = predict_mb(config, [(RANK, LORA_TARGETS)] * 9, 0, 2048, 2, layout)
        table.append(["prediction", "Mistral-7B shapes × 9 rank-16 adapters, 2048 tokens, bf16, no teacher cache",
                      layout, f"{sum(predicted.values()):.0f}", "", "", "",
                      ", ".join(f"{p.removesuffix('_mb')} {v:.0f}" for p, v in sorted(predicted.items()))])
    write_table("account", ["section", "run", "layout", "predicted MB (bench)", "predicted MB (report)",
                            "measured MB", "bench predicted / measured", "parts MB predicted/measured"], table,
                f"Measured: the child's peak RSS (VmHWM) less {interpreter:.0f} MB, the peak RSS of a child that only "
                "imports torch, transformers and the library; parts: calibration.json's *_mb keys.")


def main() -> None:
    global OUT
    sections = {"real": section_real, "warm": section_warm, "llama1b": section_llama1b,
                "streamed": section_streamed, "account": section_account}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="real,warm,llama1b,streamed,account",
                        help=f"comma-separated, of {', '.join(sections)}")
    parser.add_argument("--zoo", type=Path, default=REPO / ".mergeplan" / "zoo-r",
                        help="the real zoo: its experts (real), its tokenizer and train texts (llama1b, streamed)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the runs and tables go")
    parser.add_argument("--methods", default="expert_merging,expert_merging_pp", help="real: the methods")
    parser.add_argument("--seeds", default="0,1,2", help="real: seeds with task_vectors=auto")
    parser.add_argument("--dense-seeds", default="0", help="real: seeds with task_vectors=resident")
    parser.add_argument("--max-examples", type=int, default=20, help="real: eval examples per domain")
    parser.add_argument("--tiny", action="store_true", help="llama1b, streamed: hidden 64, 2 layers (plumbing)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype the random checkpoints are stored in (calibration computes in float32 on CPU)")
    parser.add_argument("--layout", default="auto", choices=("auto", "resident"), help="llama1b's task_vectors")
    parser.add_argument("--streamed-layouts", default="streamed,resident", help="streamed: task_vectors values")
    parser.add_argument("--tokens", type=int, default=256, help="llama1b, streamed: tokens per sample")
    parser.add_argument("--experts", type=int, default=9, help="llama1b adapters")
    parser.add_argument("--warm-method", default="expert_merging_pp", help="warm: the method")
    parser.add_argument("--warm-epochs", type=int, default=1, help="warm: the warm start's epochs")
    parser.add_argument("--samples", type=int, default=8, help="llama1b, streamed: samples per expert")
    args = parser.parse_args()
    OUT = args.out.resolve()
    args.seeds, args.dense_seeds = ([int(s) for s in text.split(",") if s] for text in (args.seeds, args.dense_seeds))
    chosen = args.sections.split(",")
    for section in chosen:
        if section not in sections:
            parser.error(f"--sections: unknown section {section!r}")
    OUT.mkdir(parents=True, exist_ok=True)
    for section in chosen:
        print(f"== {section}", flush=True)
        sections[section](args)


if __name__ == "__main__":
    main()
