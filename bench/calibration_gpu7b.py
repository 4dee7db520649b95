"""The GPU check of calibration at scale: a random Mistral-7B-shape model in bf16, 9 rank-16 adapters factored.

One prepared script for a GPU machine (never run on the CPU except --tiny, a plumbing check): times the factored
calibration step against a frozen-base forward + backward of the same batch and reports
torch.cuda.max_memory_allocated; rows go to bench/out/calibration_scale/gpu7b/.

    .venv/bin/python bench/calibration_gpu7b.py                 # on a GPU machine
    .venv/bin/python bench/calibration_gpu7b.py --tiny          # plumbing, CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from calibration_scale import MISTRAL_7B, OUT, RANK, SHAPES, load_rows, num, save, write_table

from merging.io.synthetic import LORA_TARGETS


def section_gpu7b(args) -> None:
    """A random Mistral-7B-shape Llama built in bf16 on the GPU (no disk); every linear becomes the lead's
    merging.calibration.factored.MergedLinear over 9 random rank-16 adapters (LowRank factors, R = 144). Times the
    factored calibration step (teacher forward with α one-hot on adapter k, student forward with α = σ(r), logit
    KL, backward to r) against a frozen-base forward+backward with one trainable scalar per linear (the 1.3×
    reference), with torch.cuda.max_memory_allocated. CUDA only; --tiny runs tiny shapes on the CPU (plumbing)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("gpu7b needs a CUDA device; it never runs on the CPU (except --tiny, a plumbing check)")
    run_file = OUT / "gpu7b" / "runs" / f"gpu7b{'-tiny' if args.tiny else ''}-{args.gpu_tokens}-k{args.experts}.json"
    if not run_file.exists():
        save(run_file, gpu7b_run(args, torch, device, run_file.stem))
    table = [[r["device"], r["tokens"], r["experts"], f"{r['reference']['step_seconds']:.3f}",
              f"{r['factored']['step_seconds']:.3f}", f"{r['ratio']:.2f}", num(r["weights_mb"]),
              num(r["reference"]["max_allocated_mb"]), num(r["factored"]["max_allocated_mb"])]
             for r in load_rows("gpu7b")]
    write_table("gpu7b", ["device", "tokens", "adapters", "reference s/step", "factored s/step", "ratio",
                          "weights + factors MB", "reference max allocated MB", "factored max allocated MB"], table,
                "Random Mistral-7B shapes in bf16, batch 1, median of --gpu-steps after a warm-up.")


def gpu7b_run(args, torch, device: str, name: str) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from merging.calibration.factored import MergedLinear
    from merging.calibration.sources import LowRank, TensorSources

    shape = {**SHAPES["tiny"], "vocab_size": 1000} if args.tiny else MISTRAL_7B
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=4096))
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    k_experts, bf16 = args.experts, torch.bfloat16
    merged = []  # every q, k, v, o, gate, up, down projection, replaced in place
    for module_name, module in list(model.named_modules()):
        if module_name.rsplit(".", 1)[-1] in LORA_TARGETS:
            low = LowRank(torch.arange(k_experts, device=device).repeat_interleave(RANK),
                          torch.randn(k_experts * RANK, module.in_features, device=device, dtype=bf16) * 0.02,
                          torch.randn(module.out_features, k_experts * RANK, device=device, dtype=bf16) * 0.002,
                          torch.full((k_experts * RANK,), 2.0, device=device))  # s = lora_alpha / r = 32 / 16
            parent, _, leaf = module_name.rpartition(".")
            sources = TensorSources(module_name + ".weight", tuple(module.weight.shape), torch.zeros(k_experts), low)
            merged.append(MergedLinear(module, sources))
            setattr(model.get_submodule(parent), leaf, merged[-1])
    raw = torch.zeros(len(merged), k_experts, 1, device=device, requires_grad=True)  # α = σ(r) per (linear, k)
    gain = torch.ones(len(merged), device=device, requires_grad=True)  # the reference's trainable scalars
    ids = torch.randint(shape["vocab_size"], (1, args.gpu_tokens), device=device)
    logits = lambda: model(ids, use_cache=False).logits[0].float()  # noqa: E731

    def set_alpha(alphas) -> None:
        for module, alpha in zip(merged, alphas, strict=True):
            module.alpha = alpha

    def reference_step(k: int) -> None:  # the frozen base alone, a trainable scalar on each linear's output
        lows = [m.low_rank for m in merged]
        hooks = [m.register_forward_hook(lambda mod, x, out, i=i: out * gain[i].to(out.dtype)) for i, m in
                 enumerate(merged)]
        for m in merged:
            m.low_rank = None
        torch.nn.functional.cross_entropy(logits()[:-1], ids[0, 1:]).backward()
        for m, low, hook in zip(merged, lows, hooks, strict=True):
            m.low_rank = low
            hook.remove()

    def factored_step(k: int) -> None:  # THE call to swap for the lead's whole calibration step, same inputs
        with torch.no_grad():
            set_alpha(torch.eye(k_experts, device=device)[k][None, :, None].expand(len(merged), -1, -1))
            teacher = torch.log_softmax(logits(), -1)
        set_alpha(torch.sigmoid(raw))
        student = torch.log_softmax(logits(), -1)
        torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean").backward()

    cuda = device == "cuda"

    def timed(step) -> dict:
        torch.cuda.reset_peak_memory_stats() if cuda else None
        seconds = []
        for i in range(args.gpu_steps + 1):  # the first is a warm-up
            raw.grad = gain.grad = None
            start = time.perf_counter()
            step(i % k_experts)
            torch.cuda.synchronize() if cuda else None
            seconds.append(time.perf_counter() - start)
        return {"step_seconds": statistics.median(seconds[1:]), "seconds": seconds,
                "max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}

    weights_mb = torch.cuda.memory_allocated() / 2**20 if cuda else None
    reference, factored = timed(reference_step), timed(factored_step)
    factored["alpha_grad_norm"] = raw.grad.norm().item()  # > 0: the backward pass reaches the coefficients
    return {"run": name, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "tokens": args.gpu_tokens, "experts": k_experts, "weights_mb": weights_mb,
            "reference": reference, "factored": factored, "ratio": factored["step_seconds"] / reference["step_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the plumbing only")
    parser.add_argument("--experts", type=int, default=9)
    parser.add_argument("--gpu-tokens", type=int, default=2048)
    parser.add_argument("--gpu-steps", type=int, default=5, help="timed steps after one warm-up")
    section_gpu7b(parser.parse_args())


if __name__ == "__main__":
    main()
