"""Which example fits on my GPUs, with which flags, and how fast: a planner calibrated on this project's measurements.

For a model (a preset, a checkpoint folder or a Hub id: only its config is read), a number of GPUs and machines,
a GPU type and a sequence length, it ranks the example scripts of a method (full fine-tuning, LoRA, QLoRA,
GaLore, 8-bit AdamW) that fit: the largest micro-batch that fits, the gradient accumulation for the global batch,
the predicted peak memory per GPU by term, tokens/s per GPU and the time for --tokens; what does not fit, and
which term breaks it; the best row's launch command. The model behind it (hftrain/planner.py) is closed-form memory
per method and sharding plus the MFU each recipe measured here; docs/planner.md traces every constant.

    python scripts/plan.py --model llama-3.2-1b --gpus 1 --gpu 4090 --seq_len 4096 --method full
    python scripts/plan.py --model path/to/checkpoint --gpus 8 --nodes 2 --gpu h100 --seq_len 8192 --method full --json
    python scripts/plan.py --check results/throughput/*.json results/memory/memory.json   # predicted vs measured

`--check` predicts every row of results files that scripts/benchmarks/ wrote and prints predicted against measured.
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from hftrain.errors import UserError
from hftrain.gpus import BY_KEY, GPU
from hftrain.planner import (
    fits,
    launch_command,
    load_shape,
    measured_rows,
    memory_terms,
    needed_gib,
    plan,
    tokens_per_second_per_gpu,
)


@dataclass
class PlanArguments:
    model: str = field(default="", metadata={"help": "A preset, a checkpoint folder (its config.json) or a Hub id."})
    gpus: int = field(default=1, metadata={"help": "GPUs per machine."})
    nodes: int = field(default=1, metadata={"help": "Machines (each with --gpus GPUs)."})
    gpu: str = field(default="h100", metadata={"help": f"GPU type: {', '.join(BY_KEY)}; another with --gpu_memory_gib."})
    gpu_memory_gib: float = field(default=0.0, metadata={"help": "Memory per GPU in GiB (overrides the table's)."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per sequence (row)."})
    method: str = field(default="full", metadata={"help": "full, lora, qlora, galore or adam8bit."})
    tokens: float = field(default=1e9, metadata={"help": "Training tokens, for the predicted time."})
    global_batch_tokens: int = field(default=2**18, metadata={"help": "Tokens per optimizer step, all GPUs together."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of the table."})
    check: list[str] = field(
        default_factory=list, metadata={"help": "Results JSON files of scripts/benchmarks/: predict every row instead."}
    )


METHODS = ("full", "lora", "qlora", "galore", "adam8bit")


def the_gpu(args: PlanArguments) -> GPU:
    if args.gpu in BY_KEY:
        gpu = BY_KEY[args.gpu]
        return replace(gpu, memory_gib=args.gpu_memory_gib or gpu.memory_gib)
    if not args.gpu_memory_gib:
        raise UserError(
            f"unknown --gpu {args.gpu}; pass one of {', '.join(BY_KEY)}, or give its memory with --gpu_memory_gib "
            "(the time is then not predicted: its peak is unknown)"
        )
    return GPU(args.gpu, args.gpu, 0.0, args.gpu_memory_gib, False, "--gpu_memory_gib")


def check_arguments(args: PlanArguments) -> None:
    if not args.model:
        raise UserError("pass --model (a preset, a checkpoint folder or a Hub id), or --check <results JSON files>")
    if args.gpus < 1 or args.nodes < 1:
        raise UserError(f"--gpus and --nodes must be at least 1 (got --gpus {args.gpus} --nodes {args.nodes})")
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method}; choose one of {', '.join(METHODS)}")
    if args.seq_len < 1 or args.tokens <= 0 or args.global_batch_tokens < args.seq_len:
        raise UserError("--seq_len and --tokens must be positive and --global_batch_tokens at least --seq_len")


def main() -> None:
    (args,) = HfArgumentParser(PlanArguments).parse_args_into_dataclasses()
    if args.check:
        return check(args.check, args.json)
    check_arguments(args)
    gpu = the_gpu(args)
    shape = load_shape(args.model)
    if shape.positions and args.seq_len > shape.positions:
        raise UserError(
            f"--seq_len {args.seq_len} is longer than the {shape.positions} positions of {args.model} "
            "(max_position_embeddings); pass a shorter --seq_len or a model with more positions"
        )
    options = plan(shape, args.method, args.gpus, args.nodes, gpu, args.seq_len, args.global_batch_tokens)
    gpus = args.gpus * args.nodes
    best = next((o for o in options if o.fits), None)
    launch = launch_command(best, args.model, args.seq_len, args.gpus, args.nodes) if best else None
    rows: list[dict[str, Any]] = []
    for o in options:
        tps = o.tokens_per_s_per_gpu
        rows.append(
            {
                "script": f"scripts/{o.example.script}",
                "config": o.example.config,
                "flags": [*o.example.flags, f"--per_device_train_batch_size {o.micro_batch}"]
                + ([f"--gradient_accumulation_steps {o.accumulation}"] if o.accumulation > 1 else []),
                "fits": o.fits,
                "peak_memory_gib": round(o.peak_memory_gib, 2),
                "memory_gib": {k: round(v, 2) for k, v in o.memory.items()},
                "tokens_per_s_per_gpu": round(tps) if tps else None,
                "hours_for_tokens": round(args.tokens / (tps * gpus) / 3600, 2) if tps else None,
                "breaks": o.breaks,
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "parameters": shape.params,
                    "gpu": gpu.key,
                    "gpu_memory_gib": gpu.memory_gib,
                    "gpus": gpus,
                    "seq_len": args.seq_len,
                    "method": args.method,
                    "tokens": args.tokens,
                    "options": rows,
                    "launch": launch,
                },
                indent=2,
            )
        )
        return
    print(
        f"{args.model} ({shape.params / 1e9:.2f}B parameters), {args.method}, {args.nodes} x {args.gpus} {gpu.key} "
        f"({gpu.memory_gib:g} GiB each), T = {args.seq_len}, {args.global_batch_tokens:,} tokens per step"
    )
    print(
        "\n| # | script | config | flags | peak GiB/GPU (weights + grads + optimizer + activations + logits + buffers) | tokens/s/GPU | time |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, (o, r) in enumerate(zip(options, rows)):
        if not o.fits:
            continue
        m = o.memory
        terms = " + ".join(f"{m[k]:.1f}" for k in m)
        rate = f"{r['tokens_per_s_per_gpu']:,}" if r["tokens_per_s_per_gpu"] else "n/a"
        hours = f"{r['hours_for_tokens']:g} h" if r["hours_for_tokens"] is not None else "n/a"
        print(
            f"| {i + 1} | {r['script']} | {r['config'] or '-'} | {' '.join(r['flags'])} | {o.peak_memory_gib:.1f} = {terms} | {rate} | {hours} |"
        )
    for o, r in zip(options, rows):
        if not o.fits:
            print(
                f"does not fit: {r['script']} {' '.join(o.example.flags)}: {o.peak_memory_gib:.1f} GiB at micro-batch 1, "
                f"{needed_gib(o.peak_memory_gib):.1f} GiB with the margin > {gpu.memory_gib:g} GiB (largest term: "
                f"{o.breaks} {o.memory[o.breaks]:.1f} GiB)"
            )
    if not options:
        print(f"no example runs {args.method} on {gpus} GPU(s)")
    print(f"\nlaunch: {launch}" if launch else "\nnothing fits: more GPUs, a shorter --seq_len, or --method lora/qlora")
    if best:
        print(f"time for {args.tokens:.3g} tokens on {gpus} GPU(s): {rows[options.index(best)]['hours_for_tokens']} h")


def check(paths: list[str], as_json: bool) -> None:
    """Predicted against measured for every row of the results files."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} as JSON ({type(e).__name__}); pass results files of scripts/benchmarks/")
        for m in measured_rows(result, path):
            memory = sum(memory_terms(m.shape, m.setup).values())
            tps = tokens_per_second_per_gpu(m.shape, m.setup, m.gpu)
            out.append(
                {
                    "file": path,
                    "row": m.label,
                    "measured_memory_gib": round(m.peak_memory_gib, 3),
                    "predicted_memory_gib": round(memory, 3),
                    "memory_error": memory / m.peak_memory_gib - 1,
                    "measured_tokens_per_s_per_gpu": round(m.tokens_per_s_per_gpu, 1),
                    "predicted_tokens_per_s_per_gpu": round(tps, 1),
                    "tokens_per_s_error": tps / m.tokens_per_s_per_gpu - 1,
                    "fits": fits(memory, m.gpu.memory_gib),
                }
            )
    worst_memory = max((abs(r["memory_error"]) for r in out), default=0.0)
    worst_tps = max((abs(r["tokens_per_s_error"]) for r in out), default=0.0)
    if as_json:
        print(json.dumps({"worst_memory_error": worst_memory, "worst_tokens_per_s_error": worst_tps, "rows": out}, indent=2))
        return
    print("| row | memory GiB measured / predicted | error | tokens/s/GPU measured / predicted | error |")
    print("|---|---|---|---|---|")
    for r in out:
        print(
            f"| {r['row']} | {r['measured_memory_gib']:.2f} / {r['predicted_memory_gib']:.2f} | {r['memory_error']:+.1%} "
            f"| {r['measured_tokens_per_s_per_gpu']:,.0f} / {r['predicted_tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s_error']:+.1%} |"
        )
    print(f"worst error: memory {worst_memory:.1%}, tokens/s {worst_tps:.1%} over {len(out)} rows")
    if not math.isfinite(worst_memory):
        raise UserError("a row's prediction is not finite")


if __name__ == "__main__":
    main()
