"""What each memory-saving technique buys: peak GPU memory and tokens/s on one GPU, side by side.

Fine-tunes the `1b` preset (Llama-3.2-1B shape) a few steps six ways, each in a fresh
process (so one case's cached memory never counts against the next), with the same batch,
sequence length and bf16 weights, on synthetic fixed-length data:

| case | what it changes (bytes per parameter: weights + gradients + optimizer state) |
|---|---|
| `full_adamw` | nothing: bf16 weights 2 + bf16 gradients 2 + Adam's two moments 4 = 8 |
| `full_adamw_8bit` | bitsandbytes 8-bit AdamW: moments in 1 byte each, 2 + 2 + 2 = 6 |
| `galore_adamw` | GaLore: moments of a rank-r projection of each attention/MLP gradient, 2 + 2 + ~1 |
| `galore_adamw_8bit_layerwise` | and 8-bit, stepped inside backward: no full set of gradients, ~2 + ~0 + ~0.5 |
| `lora` | frozen bf16 base, adapters only learn: 2 + ~0 + ~0 |
| `qlora` | frozen 4-bit NF4 base: ~0.55 + ~0 + ~0 (paged 8-bit AdamW for the adapters) |

The cases are built here, one per fresh process (`measure_case`), not launched from the examples
(scripts/trainer/galore.py, qlora.py): the table counts what only the process holding the model sees
(the optimizer state's and the loaded weights' bytes), in pure bf16 weights on fixed-length rows, where
the examples train in mixed precision on the data's own documents.

Activation checkpointing is on in every case (as QLoRA's recipe has it), so activations are
small and the differences are the weights, gradients and optimizer state each technique
shrinks; `--no_activation_checkpointing` measures without it. "Full" fine-tuning here keeps
pure bf16 weights, the GaLore paper's "BF16" baseline; mixed precision with float32 master
weights (the Trainer's `bf16=True` on a float32 model) costs 16 bytes per parameter instead.
tokens/s is measured after `--warmup_steps` steps, so GaLore's SVD (step 0, then every
`update_proj_gap` = 200 steps) is left out: it is the steady state between refreshes.

    python scripts/benchmarks/memory.py                 # one GPU, ~5 minutes on an H100 (invoke bench-memory)
    python scripts/benchmarks/memory.py --cases lora,qlora --seq_len 1024
    python scripts/benchmarks/memory.py --smoke         # tiny preset, CPU-capable cases, 2 steps

Writes results/memory/memory.json (device, versions, date, settings, every number)
and memory.md (the table). Peak memory is `torch.cuda.max_memory_allocated` while training;
paged optimizer state lives in CUDA unified memory outside PyTorch's allocator and is not in
it (it is in the "optimizer state" column, which counts bytes wherever they live).

Docs: https://huggingface.co/docs/transformers/perf_train_gpu_one
      https://huggingface.co/docs/transformers/optimizers
      https://arxiv.org/abs/2403.03507 (GaLore), https://arxiv.org/abs/2305.14314 (QLoRA)
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

from hftrain.benchmarking import GALORE_TARGET_MODULES, CaseProcess, case_env, machine, output_dir
from hftrain.data import DEFAULT_DATA_DIR, load_prepared
from hftrain.errors import UserError
from hftrain.extras import require_extra
from hftrain.models import load_model, save_preset_base
from hftrain.quantization import load_4bit
from hftrain.reporting import ThroughputCallback


@dataclass(frozen=True)
class Case:
    optim: str  # TrainingArguments.optim
    adapter: str = ""  # "lora": LoRA adapters on every linear layer; "qlora": the same on a 4-bit NF4 base
    cpu: bool = True  # runs on CPU (the smoke run); the 8-bit GaLore variants call torch.cuda.synchronize()


CASES = {
    "full_adamw": Case("adamw_torch"),
    "full_adamw_8bit": Case("adamw_bnb_8bit"),
    "galore_adamw": Case("galore_adamw"),
    "galore_adamw_8bit_layerwise": Case("galore_adamw_8bit_layerwise", cpu=False),
    "lora": Case("adamw_torch", adapter="lora"),
    "qlora": Case("paged_adamw_8bit", adapter="qlora"),
}


@dataclass
class TableArguments:
    model: str = field(default="1b", metadata={"help": "The preset to fine-tune (tiny, small, 1b)."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per sequence (every sequence has exactly this many)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step; the default fits every case on an 80 GB GPU."})
    steps: int = field(default=8, metadata={"help": "Measured steps per case."})
    warmup_steps: int = field(default=3, metadata={"help": "Steps before the clock starts (kernel selection, GaLore's SVD)."})
    cases: str = field(default="all", metadata={"help": f"Comma-separated subset of: {', '.join(CASES)}."})
    activation_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in backward (all cases)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (lora, qlora); alpha is twice the rank."})
    galore_args: str = field(
        default="rank=512,update_proj_gap=200,scale=0.25",
        metadata={"help": "GaLore optim_args; rank 512 is 1/4 of the 1b preset's width, the paper's ratio (1024 of 4096 at 7B)."},
    )
    case_timeout: int = field(default=300, metadata={"help": "Seconds before a case is stopped and reported as failed."})
    data_dir: str = field(default=DEFAULT_DATA_DIR, metadata={"help": "Prepared data; only its tokenizer is used."})
    output_dir: str = field(default="", metadata={"help": "Default: results/memory (--smoke: output/benchmarks/memory-smoke)."})
    smoke: bool = field(default=False, metadata={"help": "Tiny preset, the CPU-capable cases, 2 steps: checks the script runs."})
    worker: str = field(default="", metadata={"help": "Internal: run this one case in this process."})
    base_dir: str = field(default="", metadata={"help": "Internal: the saved base checkpoint the cases load."})
    result_file: str = field(default="", metadata={"help": "Internal: where the worker writes its JSON result."})


class FixedLengthTokens(torch.utils.data.Dataset):
    """Random token ids, every sequence `seq_len` long: no padding, so every case sees the same tokens."""

    def __init__(self, vocab_size: int, seq_len: int, n: int) -> None:
        self.ids = torch.randint(0, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes in the optimizer's state (moments, 8-bit scales, GaLore projections), wherever they live."""
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "optimizer_dict"):
        optimizer = optimizer.optimizer  # accelerate's wrapper
    # Layer-wise optimizers are one small optimizer per parameter behind a dummy.
    optimizers = set(optimizer.optimizer_dict.values()) if hasattr(optimizer, "optimizer_dict") else {optimizer}
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                tensor = getattr(value, "ortho_matrix", value)  # GaLore keeps its projection in a projector object
                if isinstance(tensor, torch.Tensor):
                    total += tensor.nbytes
    return total


def measure_case(case: str, args: TableArguments) -> dict[str, Any]:
    """One case, in this (fresh) process: load the base, train a few steps, measure."""
    optim, lora, four_bit = CASES[case].optim, bool(CASES[case].adapter), CASES[case].adapter == "qlora"
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # bnb's CPU kernels and CPU matmuls want float32
    if not cuda and optim == "paged_adamw_8bit":
        optim = "adamw_bnb_8bit"  # paging is a CUDA feature; the same 8-bit AdamW runs unpaged on CPU
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir, trust_remote_code=False)  # the base this script saved
    if lora:  # imported only where needed: peft imports bitsandbytes, seconds per process
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if four_bit:
        model = load_4bit(args.base_dir, tokenizer, dtype, device)
        # Checkpointing is switched on by TrainingArguments below, the same way for every case.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_model(args.base_dir, tokenizer, dtype=dtype, device_map={"": str(device)})
    if lora:
        config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Peak memory from the first step on (its optimizer step allocates the state); tokens/s after the warm-up.
    clock = ThroughputCallback(args.seq_len, warmup_steps=args.warmup_steps, peak_memory_over_warmup=True)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            max_steps=args.warmup_steps + args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=1e-5,
            optim=optim,
            optim_target_modules=GALORE_TARGET_MODULES if optim.startswith("galore") else None,
            optim_args=args.galore_args if optim.startswith("galore") else None,
            activation_checkpointing=args.activation_checkpointing,
            include_num_input_tokens_seen="all",  # every token is real: no padding in FixedLengthTokens
            bf16=cuda,
            use_cpu=not cuda,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            dataloader_pin_memory=False,
            disable_tqdm=True,
            seed=0,
        )
        data = FixedLengthTokens(len(tokenizer), args.seq_len, (args.warmup_steps + args.steps) * args.batch_size)
        trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[clock])
        trainer.train()
    m = clock.metrics
    return {
        "case": case,
        "optim": optim,
        "trainable_parameters": trainable,
        "model_bytes": model_bytes,  # parameters and buffers as loaded (4-bit: packed)
        "peak_memory_gib": m["peak_memory_gib"],
        "tokens_per_second": m["train_tokens_per_second"],
        "seconds_per_step": round(m["train_runtime_s"] / clock.steps, 4),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
    }


def worker_command(args: TableArguments, case: str, base: str, result_file: Path) -> list[str]:
    """This script again, for one case, with the (possibly --smoke-adjusted) settings spelled out."""
    settings = {
        k: v for k, v in vars(args).items() if k not in ("worker", "base_dir", "result_file", "output_dir", "cases", "smoke")
    }
    cmd = [sys.executable, __file__, "--worker", case, "--base_dir", base, "--result_file", str(result_file)]
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def build_base(args: TableArguments, folder: str) -> str:
    """The preset with seeded random weights, saved once (<folder>/base) as the checkpoint every case loads."""
    data = load_prepared(args.data_dir)
    cuda = torch.cuda.is_available()
    set_seed(0)
    path = save_preset_base(
        args.model, data.tokenizer, folder, dtype=torch.bfloat16 if cuda else torch.float32, device="cuda" if cuda else "cpu"
    )
    if cuda:
        torch.cuda.empty_cache()  # the parent keeps only its CUDA context while the cases run
    return path


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    rows = [r for r in report["results"] if "peak_memory_gib" in r]
    full = next((r["peak_memory_gib"] for r in rows if r["case"] == "full_adamw"), None)
    lines = [
        f"# Memory-efficient fine-tuning: the `{s['model']}` preset on one {report['device']}",
        "",
        f"{report['date']} | batch {s['batch_size']} x {s['seq_len']} tokens | {report['dtype']} weights | "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'} | {s['steps']} measured steps "
        f"after {s['warmup_steps']} | LoRA r={s['lora_r']} on all linear layers | GaLore {s['galore_args']}",
        "",
        "| case | optim | trainable parameters | weights (GiB) | optimizer state (GiB) | peak memory (GiB) | vs full AdamW | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        vs = f"{r['peak_memory_gib'] / full - 1:+.0%}" if full else ""
        lines.append(
            f"| {r['case']} | `{r['optim']}` | {r['trainable_parameters']:,} | {r['model_bytes'] / 2**30:.3f} | "
            f"{r['optimizer_state_bytes'] / 2**30:.3f} | {r['peak_memory_gib']:.2f} | {vs} | {r['tokens_per_second']:,.0f} |"
        )
    by_case = {r["case"]: r for r in rows}
    base, galore, lora, qlora = (by_case.get(c) for c in ("full_adamw", "galore_adamw_8bit_layerwise", "lora", "qlora"))
    if base and galore:
        state = galore["optimizer_state_bytes"] / base["optimizer_state_bytes"] - 1
        lines += [
            "",
            f"8-bit GaLore (layer-wise) against full AdamW: optimizer state {state:+.1%}, peak memory "
            f"{galore['peak_memory_gib'] / base['peak_memory_gib'] - 1:+.1%}. The GaLore paper reports -65.5% optimizer "
            "state and -63.3% total for 8-bit GaLore against its BF16 baseline at 7B (rank 1/4 of the width, as here).",
        ]
    if lora and qlora:
        lines += [
            "",
            f"QLoRA's frozen base takes {qlora['model_bytes'] / 2**30:.2f} GiB against LoRA's {lora['model_bytes'] / 2**30:.2f} "
            f"GiB in {report['dtype']} ({lora['model_bytes'] / qlora['model_bytes']:.1f}x less); the QLoRA paper fine-tunes a 65B model on "
            "one 48 GB GPU this way.",
        ]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += ["", f"Peak memory: {report['peak_memory_kind']}. Versions: {versions}.", ""]
    return "\n".join(lines)


def main() -> None:
    (args,) = HfArgumentParser(TableArguments).parse_args_into_dataclasses()
    if args.worker:  # the child: one case, result to a file
        Path(args.result_file).write_text(json.dumps(measure_case(args.worker, args)))
        return
    for module in ("bitsandbytes", "galore_torch"):  # the 8-bit, GaLore and QLoRA rows
        require_extra(module)

    cuda = torch.cuda.is_available()
    if args.smoke:
        args.model, args.seq_len, args.batch_size, args.steps, args.warmup_steps = "tiny", 64, 2, 2, 0
        args.galore_args = "rank=8,update_proj_gap=200,scale=0.25"
    elif not cuda:
        raise UserError("the memory table measures GPU memory and needs a CUDA GPU; pass --smoke for a quick CPU check")
    names = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise UserError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if not cuda:
        names = [c for c in names if CASES[c].cpu]
    out = output_dir("memory", args.smoke, args.output_dir)

    # Every case runs on the first visible GPU only: plain `python` on several GPUs would make the
    # Trainer use DataParallel, and the table is about what fits on one.
    env = case_env(one_gpu=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args, tmp)
        # On a GPU one case at a time (they would share its memory and its time); in the smoke test
        # the numbers mean nothing, so there the cases start side by side to save wall time.
        for batch in [names] if args.smoke else [[c] for c in names]:
            started = []
            for case in batch:
                print(f"[memory] {case} ...", flush=True)
                result_file = Path(tmp, f"{case}.json")
                started.append(
                    CaseProcess(case, worker_command(args, case, base, result_file), env, result_file, args.case_timeout)
                )
            for proc in started:
                results.append({"case": proc.name, **proc.result()})
                print(f"[memory] {proc.name}: {results[-1]}", flush=True)

    report = {
        **machine("torch", "transformers", "peft", "accelerate", "bitsandbytes", "galore-torch"),
        "dtype": "bf16" if cuda else "float32",
        "peak_memory_kind": "torch.cuda.max_memory_allocated while training" if cuda else "CPU peak resident set (smoke)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "base_dir", "result_file", "output_dir")},
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "memory.md").write_text(markdown(report))
    print(markdown(report))
    failed = [r["case"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"error: {len(failed)} case(s) failed: {', '.join(failed)} (their output is above)")
    print(f"done: {len(results)} cases | {out / 'memory.md'}")


if __name__ == "__main__":
    main()
