"""Benchmark: tokens/s per GPU, MFU and peak memory of every technique, beside what people use instead.

Every case is one Trainer run in a fresh process on the same data (documents of 256-2048 tokens),
the same model (`--model`: a preset, e.g. `llama-3.2-1b`, the exact Llama-3.2-1B shape with its
128,256-token vocabulary, or a checkpoint directory; bf16 mixed precision) and sequence length (2048).
Only the case's own settings change: how batches are built, the attention implementation, Liger
kernels, `torch.compile`, float8, the micro-batch, the optimizer, an adapter, the number of GPUs.

Peers, built the way people use the Hugging Face stack (other projects' settings, not examples of ours: these rows
are built here, in the case's own process, `measure_case`):
- P1: padded batches from a padding collator, SDPA: what a new Trainer user gets.
- P2: `run_clm.py` style: documents concatenated and cut into full 2048-token blocks, SDPA.
  Nothing is padded, but attention crosses document boundaries.
- P3: P2 tuned as far as the stack goes without changing what it computes: Liger kernels,
  `torch.compile`, the largest micro-batch that fits.
The project's cases keep documents isolated (padding-free rows, FlashAttention-2's varlen kernel
attending within each document) and add Liger, regional compilation, float8 and the large micro-batch. Each
is the example itself, launched as a user runs it: scripts/sdpa/flash_attention.py with the flags the case
names (`example_flags`, recorded in the row as `command`), for QLoRA scripts/trainer/qlora.py, and for
FSDP2 + QLoRA scripts/trainer/sharded/fsdp_qlora.py under accelerate_config_fsdp_qlora.yaml; the row's numbers are the
ones the script writes to its metrics.json (`hftrain.benchmarking.after_warmup`). The several-GPU rows
scale the P3 peer (DDP, FSDP2, ZeRO-3) and are built here too.

Numbers: tokens/s counts real tokens only (no padding) over the steps after the warm-up; MFU uses
nanoGPT's 6N + 12·L·H·T FLOPs per token with T = 2048 for every case, against the GPU's datasheet
peak and against the bf16 matmul rate measured at the start; peak memory is allocated and reserved
after the warm-up (a launched example: over the logged steps after it). A case whose package or hardware is
missing is reported as skipped, with why.

    python scripts/prepare_datasets.py --dataset synthetic-long --num_examples 2000 --max_length 2048
    python scripts/benchmarks/throughput.py                   # every case the GPUs here can run (invoke bench)
    python scripts/benchmarks/throughput.py --cases P1,P2,P3  # a subset: names or prefixes (--list shows them)
    python scripts/benchmarks/throughput.py --smoke           # CPU, seconds: the tiny preset, to check the harness
    python scripts/benchmarks/throughput.py --model llama-3.2-1b --profile_steps 2 --output results/throughput/llama-3.2-1b

Writes results/throughput/benchmark.json (every row, the model's config, device, versions, date),
benchmark.md (the tables) and benchmark.png (tokens/s and memory per case). `--profile_steps N`
profiles N steps after the measured ones (torch.profiler) of the cases built here and adds where the GPU time went
(hftrain.profiling: attention, matmuls, output layer + loss, optimizer, idle, syncs, graph breaks).
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import contextlib
import functools
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    PretrainedConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hftrain.benchmarking import (
    GALORE_TARGET_MODULES,
    ROOT,
    SCRIPTS,
    accelerate_launch,
    after_warmup,
    case_env,
    example_command,
    machine,
    output_dir,
    run_case,
    save_figure,
    subplots,
    trainer_flags,
)
from hftrain.data import PadCollator, Prepared, load_prepared
from hftrain.errors import UserError
from hftrain.models import PRESETS, load_config, load_model, preset_config
from hftrain.profiling import BUCKETS, ProfileSteps, compile_counters
from hftrain.quantization import has_float8_tensor_cores
from hftrain.recipe import FUSED_LOSS_ONLY
from hftrain.reporting import ThroughputCallback, flops_per_token, peak_flops
from hftrain.sharding import gather_lm_head_for_liger


@dataclass(frozen=True)
class Case:
    name: str
    batches: str  # "padded": one document per row, padded to the longest; "blocks": run_clm's 2048-token blocks;
    # "packed": whole documents packed into rows of <= 2048 tokens and flattened (padding-free, isolated)
    attn: str = "sdpa"
    micro_batch: int = 8  # rows per GPU and step (a row holds up to 2048 tokens)
    big_batch: bool = False  # micro_batch is the largest that fits: --big_batch rows
    liger: bool = False  # TrainingArguments(use_liger_kernel=True): RMSNorm, SwiGLU, RoPE, fused linear + loss
    fused_loss: bool = False  # Liger's fused linear + cross-entropy alone (hftrain.recipe.FUSED_LOSS_ONLY)
    compile: str = ""  # "model": TrainingArguments(torch_compile=True); "layers": each decoder layer compiled
    fp8: bool = False  # torchao's Float8Linear for the decoder's linear layers (tensorwise scales)
    optim: str = "adamw_torch_fused"
    adapter: str = ""  # "lora" or "qlora"
    gpus: int = 1
    launch: str = ""  # accelerate config for cases on several GPUs ("+deepspeed" adds deepspeed_config.json)
    peer: str = ""  # P1, P2, P3 for the peer cases
    baseline: str = ""  # the 1-GPU case a distributed case's scaling efficiency is measured against
    script: str = ""  # the example a case of ours launches (under scripts/); "": a peer, built in its own process here


FLASH_ATTENTION = "sdpa/flash_attention.py"
GALORE_ARGS = "rank=128,update_proj_gap=200,scale=0.25"


def packed(name: str, **kwargs: Any) -> Case:
    """The project's batches: whole documents, padding-free, isolated by FlashAttention-2's varlen kernel; the case
    is flash_attention.py with --pack_rows."""
    return Case(name, "packed", **{"attn": "flash_attention_2", "script": FLASH_ATTENTION, **kwargs})


def example_flags(case: Case, seq_len: int) -> list[str]:
    """The flags of the case's example that make the case (the script's defaults left out; the micro-batch is
    `trainer_flags`'s --per_device_train_batch_size): what a user types."""
    if case.script != FLASH_ATTENTION:
        return ["--learning_rate", "1e-3"] if case.adapter else []  # (fsdp_)qlora.py: its own settings, few parameters
    flags = [] if case.attn == "flash_attention_2" else ["--attn_implementation", case.attn]
    flags += ["--padding_free", "false"] if case.batches == "padded" else ["--pack_rows", str(seq_len)]
    flags += [
        f"--{on}" for on, wanted in (("compile_layers", case.compile == "layers"), ("fused_loss", case.fused_loss)) if wanted
    ]
    flags += ["--fp8"] if case.fp8 else []
    flags += ["--use_liger_kernel", "true"] if case.liger else []
    flags += [] if case.optim == "adamw_torch_fused" else ["--optim", case.optim]
    if "galore" in case.optim:
        flags += ["--optim_target_modules", GALORE_TARGET_MODULES, "--optim_args", GALORE_ARGS]
    return flags


CASES = [
    Case("P1: padded + SDPA", "padded", peer="P1"),
    Case("P2: 2048-token blocks + SDPA", "blocks", peer="P2"),
    Case("P3: blocks + Liger (big batch)", "blocks", liger=True, big_batch=True, peer="P3"),
    Case("P3: blocks + torch.compile", "blocks", compile="model", peer="P3"),
    Case("P3: blocks + Liger + torch.compile (big batch)", "blocks", liger=True, compile="model", big_batch=True, peer="P3"),
    Case("P3: blocks + Liger + compiled layers (big batch)", "blocks", liger=True, compile="layers", big_batch=True, peer="P3"),
    Case(
        "P3: blocks + compiled layers + fused loss (big batch)",
        "blocks",
        fused_loss=True,
        compile="layers",
        big_batch=True,
        peer="P3",
    ),
    Case("P3: blocks + Liger (24 rows)", "blocks", liger=True, micro_batch=24, peer="P3"),
    Case("P3: blocks + Liger (32 rows)", "blocks", liger=True, micro_batch=32, peer="P3"),
    packed("SDPA padding-free (block-diagonal mask)", attn="sdpa"),
    Case("FA2 padded", "padded", attn="flash_attention_2", script=FLASH_ATTENTION),
    packed("FA2 padding-free"),
    packed("FA2 padding-free + Liger (big batch)", liger=True, big_batch=True),
    packed("FA2 padding-free + compiled layers", compile="layers"),
    packed("FA2 padding-free + compiled layers (big batch)", compile="layers", big_batch=True),
    packed("FA2 padding-free + Liger + compiled layers (big batch)", liger=True, compile="layers", big_batch=True),
    packed("FA2 padding-free + float8 + compiled layers", fp8=True, compile="layers"),
    packed("FA2 padding-free + float8 + compiled layers (big batch)", fp8=True, compile="layers", big_batch=True),
    # The recipe (hftrain.recipe.Recipe: flash_attention.py --pack_rows 2048 --compile_layers --fused_loss):
    # compiled layers, Liger's fused linear + loss alone, so the 128k-vocabulary logits never exist whole
    packed("FA2 padding-free + compiled layers + fused loss (big batch)", compile="layers", fused_loss=True, big_batch=True),
    packed(
        "FA2 padding-free + float8 + compiled layers + fused loss (big batch)",
        fp8=True,
        compile="layers",
        fused_loss=True,
        big_batch=True,
    ),
    packed("FA2 padding-free + compiled layers + fused loss (24 rows)", compile="layers", fused_loss=True, micro_batch=24),
    packed(
        "FA2 padding-free + float8 + compiled layers + fused loss (24 rows)",
        fp8=True,
        compile="layers",
        fused_loss=True,
        micro_batch=24,
    ),
    packed(
        "Flex padding-free + compiled layers + fused loss (big batch)",
        attn="flex_attention",
        compile="layers",
        fused_loss=True,
        big_batch=True,
    ),
    # QLoRA as scripts/trainer/qlora.py teaches it: its own padded batches, gradient checkpointing, 8-bit paged AdamW
    Case("QLoRA (qlora.py)", "padded", adapter="qlora", optim="paged_adamw_8bit", script="trainer/qlora.py"),
    packed("GaLore (FA2 padding-free)", optim="galore_adamw"),
    packed("8-bit AdamW (FA2 padding-free)", optim="adamw_bnb_8bit"),
]
# The recipe as scripts/sdpa/flash_attention.py's docstring gives it (tests/test_benchmark.py compares the flags)
RECIPE_BF16 = "FA2 padding-free + compiled layers + fused loss (big batch)"
RECIPE_FP8 = "FA2 padding-free + float8 + compiled layers + fused loss (big batch)"
# Several GPUs: the recipe of `DIST_BASELINE` on 1 GPU, so the per-GPU ratio is the scaling efficiency.
# FSDP2 + QLoRA (scripts/trainer/sharded/fsdp_qlora.py, its own batches) is measured against itself on 1 GPU.
DIST_BASELINE = "P3: blocks + Liger (big batch)"
QLORA_FSDP = "accelerate_config_fsdp_qlora.yaml"


def fsdp_qlora(n: int) -> Case:
    return Case(
        f"FSDP2 + QLoRA x{n}",
        "padded",
        adapter="qlora",
        gpus=n,
        launch=QLORA_FSDP,
        baseline="FSDP2 + QLoRA x1" if n > 1 else "",
        script="trainer/sharded/fsdp_qlora.py",
    )


def distributed(n: int) -> list[Case]:
    big = functools.partial(Case, batches="blocks", liger=True, big_batch=True, gpus=n, baseline=DIST_BASELINE)
    cases = [
        big(f"DDP x{n}: blocks + Liger (big batch)", launch="accelerate_config.yaml"),
        big(f"FSDP2 x{n}: blocks + Liger (big batch)", launch="accelerate_config_fsdp.yaml"),
        big(f"ZeRO-3 x{n}: blocks + Liger (big batch)", launch="accelerate_config.yaml+deepspeed"),
    ]
    return cases + [fsdp_qlora(n)]


CASES += [fsdp_qlora(1)]
CASES += distributed(2) + distributed(4) + distributed(8)
SMOKE = ["P1: padded + SDPA", "P2: 2048-token blocks + SDPA", "SDPA padding-free (block-diagonal mask)"]


@dataclass
class Args:
    model: str = field(
        default="",
        metadata={
            "help": "Preset (e.g. 1b, llama-3.2-1b, qwen2.5-0.5b) or checkpoint directory, the same for every case "
            "(default: 1b; tiny with --smoke)."
        },
    )
    data_dir: str = field(default="data/synthetic-long", metadata={"help": "Prepared long documents (see above)."})
    seq_len: int = field(default=2048, metadata={"help": "Row length of blocks and packed rows; T in the MFU formula."})
    cases: str = field(default="", metadata={"help": "Comma-separated case names (default: all); --list shows them."})
    steps: int = field(default=20, metadata={"help": "Measured optimizer steps per case."})
    warmup: int = field(default=5, metadata={"help": "Steps before the measurement (compilation, allocator, autotuning)."})
    big_batch: int = field(
        default=0, metadata={"help": "The 'big batch' rows per GPU; 0: 16 on GPUs of 100 GiB or more, else 12."}
    )
    smoke: bool = field(default=False, metadata={"help": "CPU check of the harness: tiny preset, default data, 3 cases."})
    profile_steps: int = field(
        default=0, metadata={"help": "Profile this many steps after the measured ones (torch.profiler): where the time goes."}
    )
    output: str = field(
        default="",
        metadata={
            "help": "Path stem of the .json, .md and .png (default: results/throughput/benchmark; with --smoke under output/)."
        },
    )
    append: bool = field(default=False, metadata={"help": "Keep the rows already in <output>.json (same device) and add these."})
    case_timeout: int = field(default=600, metadata={"help": "Seconds before a case is stopped and reported as failed."})
    list: bool = field(default=False, metadata={"help": "Print the case names and exit."})
    run_case: str = field(default="", metadata={"help": "(internal) run this one case in this process."})
    result: str = field(default="", metadata={"help": "(internal) where --run_case writes its row."})


def skip_reason(case: Case, args: Args) -> str | None:
    """Why this machine cannot run the case, or None."""
    gpus = torch.cuda.device_count()
    if case.gpus > 1 and gpus < case.gpus:
        return f"needs {case.gpus} GPUs, {gpus} here"
    if case.attn == "flash_attention_2" and not (gpus and find_spec("flash_attn")):
        return "needs flash-attn and a CUDA GPU"
    if (case.liger or case.fused_loss) and not (gpus and find_spec("liger_kernel")):
        return "needs liger-kernel and a CUDA GPU"
    if (case.adapter == "qlora" or "bnb" in case.optim or "paged" in case.optim) and not gpus:
        return "benchmarked on CUDA only"
    if case.compile and not gpus:
        return "benchmarked on CUDA only"
    if case.fp8 and not (has_float8_tensor_cores() and find_spec("torchao")):
        return "needs torchao and a GPU with float8 tensor cores (compute capability 8.9+)"
    return None


# ---- one case, in its own process ------------------------------------------------------------------


def build_dataset(case: Case, data: Prepared, seq_len: int) -> Any:
    docs = data.train.select_columns(["input_ids"])
    if case.batches == "padded":
        return docs
    # run_clm.py's group_texts: concatenate, cut into full blocks, drop the rest
    flat = [t for ids in docs["input_ids"] for t in ids]
    blocks = [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def model_config(model: str, tokenizer: Any) -> PretrainedConfig:
    """The config of a preset (with its vocabulary) or of a checkpoint directory."""
    return preset_config(model, tokenizer) if model in PRESETS else load_config(model)


def shape_flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """FLOPs per token of the model's unquantized, unsharded shape, counted on a meta copy (no memory, no weights)."""
    with torch.device("meta"):
        return flops_per_token(AutoModelForCausalLM.from_config(config), seq_len)


def training_arguments(case: Case, args: Args, output_dir: str) -> TrainingArguments:
    """A peer case's TrainingArguments."""
    cuda = torch.cuda.is_available()
    deepspeed = str(ROOT / "deepspeed_config.json") if case.launch.endswith("+deepspeed") else None
    own: dict[str, Any] = dict(
        per_device_train_batch_size=case.micro_batch,
        optim=case.optim,
        use_liger_kernel=case.liger or case.fused_loss,
        liger_kernel_config=FUSED_LOSS_ONLY if case.fused_loss and not case.liger else None,
    )
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=args.warmup + args.steps + args.profile_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        bf16=cuda,
        use_cpu=not cuda,
        torch_compile=case.compile == "model",
        deepspeed=deepspeed,
        include_num_input_tokens_seen="non_padding",
        logging_steps=logging_steps(args),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_drop_last=True,
        seed=0,
        **own,
    )


def measure_case(case: Case, args: Args) -> dict[str, Any]:
    """One peer case, in this (fresh) process: build its model and batches, train, measure after the warm-up."""
    cuda = torch.cuda.is_available()
    data = load_prepared(args.data_dir)
    model_name = args.model
    # FLOPs from the unquantized, unsharded shape, counted on a meta copy made before TrainingArguments: once
    # those hold a ZeRO-3 config, every model created is partitioned by deepspeed.zero.Init (meta included).
    config = model_config(model_name, data.tokenizer)
    fpt = shape_flops_per_token(config, args.seq_len)
    case_dir = str(Path(args.result).with_suffix("")) if args.result else tempfile.mkdtemp(prefix="bench-")
    training_args = training_arguments(case, args, case_dir)  # before the model: ZeRO-3 partitions it while it is created
    deepspeed = training_args.deepspeed
    train = build_dataset(case, data, args.seq_len)
    set_seed(0)
    # Random init on the GPU: seconds for 1B. ZeRO-3 places the partitions itself (zero.Init), so no device there.
    with torch.device(PartialState().device) if cuda and not deepspeed else contextlib.nullcontext():
        model = load_model(model_name, data.tokenizer, attn_implementation=case.attn)
    gather_lm_head_for_liger(model, training_args)  # ZeRO-3 + Liger only
    if case.compile == "layers":  # regional compilation: one graph per decoder layer, reused by all of them
        for layer in model.get_decoder().layers:
            layer.compile()
    clock = ThroughputCallback(args.seq_len, warmup_steps=args.warmup, measured_steps=args.steps)
    profile = ProfileSteps(args.warmup + args.steps, args.profile_steps, config.vocab_size)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=PadCollator(data.tokenizer, pad_to_multiple_of=8) if case.batches == "padded" else default_data_collator,
        processing_class=data.tokenizer,
        callbacks=[clock, profile] if args.profile_steps else [clock],
    )
    trainer.train()
    m = clock.meter
    logged = [r for r in trainer.state.log_history if "loss" in r and r["step"] <= args.warmup + args.steps]
    return {
        "tokens_per_s": m.tokens / m.elapsed,  # all processes together
        "step_time_s": m.elapsed / clock.steps,
        "tokens_per_step": m.tokens / clock.steps,
        "loss": logged[-1]["loss"] if logged else None,
        "loss_curve": [[r["step"], r["loss"]] for r in logged],
        **(
            {"peak_allocated_gib": clock.metrics["peak_memory_gib"], "peak_reserved_gib": clock.metrics["peak_reserved_gib"]}
            if cuda
            else {}
        ),
        **compile_counters(),
        **({"profile": profile.result} if profile.result else {}),
        "tokens_per_s_per_gpu": m.tokens / m.elapsed / m.num_devices,
        "gpus": training_args.world_size,
        "flops_per_token": fpt,
        "micro_batch": case.micro_batch,
    }


# ---- the matrix ------------------------------------------------------------------------------------


def matmul_tflops() -> float | None:
    """The bf16 matmul rate this GPU sustains (8192^3, best of 3 x 20): MFU's practical ceiling."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    best = math.inf
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 20)
    del a, b
    torch.cuda.empty_cache()  # the cases run in other processes: leave them the memory
    return 2 * 8192**3 / best / 1e12


def logging_steps(args: Args) -> int:
    """Logged rows at the warm-up's last step and at the last measured one: the clock readings of a launched case."""
    return math.gcd(args.warmup, args.steps)


def result_file(case: Case, out: Path) -> Path:
    """Where a case's process leaves its numbers: an example's metrics.json in its --output_dir, a peer's row beside it."""
    return out / "metrics.json" if case.script else out.with_suffix(".json")


def launch(case: Case, args: Args, out: Path) -> list[str]:
    """The case's command: its example with the case's flags (`example_flags`) and the settings every case shares,
    or for a peer this script again, for that one case."""
    if case.script:
        flags = trainer_flags(args.model, args.data_dir, out, args.warmup + args.steps, logging_steps(args), case.micro_batch)
        flags += ["--lr_scheduler_type", "constant", "--warmup_steps", "0", "--dataloader_drop_last", "true"]
        flags += ["--seed", "0", "--report_to", "none", *example_flags(case, args.seq_len)]
        return example_command(case.script, flags, case.launch, case.gpus)
    own = [str(SCRIPTS / "benchmarks" / "throughput.py"), "--run_case", case.name, "--result", str(result_file(case, out))]
    own += ["--model", args.model, "--data_dir", args.data_dir, "--seq_len", str(args.seq_len)]
    own += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--profile_steps", str(args.profile_steps)]
    own += ["--smoke"] if args.smoke else []
    own += ["--big_batch", str(args.big_batch)] if args.big_batch else []  # the case's process sizes its own rows
    if not case.launch:
        return [sys.executable, *own]
    config = case.launch.removesuffix("+deepspeed")
    cmd = accelerate_launch(config, case.gpus)
    if config == "accelerate_config_fsdp.yaml":  # as the 1-GPU baseline: no activation checkpointing
        cmd += ["--fsdp_activation_checkpointing", "false", "--fsdp_cpu_ram_efficient_loading", "false"]
    return cmd + own


def example_row(case: Case, metrics: dict[str, Any], args: Args, fpt: float) -> dict[str, Any]:
    """A launched example's row, from its metrics.json: the steps after the warm-up, per GPU."""
    measured = after_warmup(metrics, args.warmup, args.steps)
    return {
        **measured,
        "tokens_per_s_per_gpu": measured["tokens_per_s"] / metrics["num_devices"],
        "gpus": metrics["num_devices"],
        "flops_per_token": fpt,
        "micro_batch": case.micro_batch,
        "command": " ".join(
            [
                f"accelerate launch --config_file {case.launch} --num_processes {case.gpus}" if case.launch else "python",
                f"scripts/{case.script}",
                *example_flags(case, args.seq_len),
                f"--per_device_train_batch_size {case.micro_batch}",
            ]
        ),
    }


def run_matrix(args: Args, cases: list[Case], fpt: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            row: dict[str, Any] = {"case": case.name, **asdict(case)}
            if reason := skip_reason(case, args):
                row["skipped"] = reason
            else:
                out = Path(tmp) / str(i)
                # a 1-GPU case is one plain process, on one GPU: its rows must be one GPU's
                env = case_env(one_gpu=not case.launch)
                measured = run_case(case.name, launch(case, args, out), env, result_file(case, out), args.case_timeout)
                if case.script and "error" not in measured:
                    try:
                        measured = {"wall_s": measured["wall_s"], **example_row(case, measured, args, fpt)}
                    except KeyError as missing:  # e.g. a run stopped early: the row says so, the others still run
                        measured = {
                            "wall_s": measured["wall_s"],
                            "error": f"its metrics.json lacks {missing} (a step's logged row or a field)",
                        }
                row |= measured
            print(
                {k: row[k] for k in row if k in ("case", "tokens_per_s_per_gpu", "peak_allocated_gib", "skipped", "error")},
                flush=True,
            )
            rows.append(row)
    return rows


VERSIONS = (
    *("torch", "transformers", "accelerate", "peft", "datasets", "flash-attn", "torchao", "liger-kernel"),
    *("bitsandbytes", "deepspeed", "galore-torch"),
)


def summarize(result: dict[str, Any]) -> None:
    """MFU columns, scaling efficiency and the best recipe against the peers, added to `result`."""
    peak, measured = peak_flops(result["device"]), result["matmul_tflops"]
    by_name = {r["case"]: r for r in result["rows"]}
    for r in result["rows"]:
        if "tokens_per_s_per_gpu" not in r:
            continue
        achieved = r["tokens_per_s_per_gpu"] * r["flops_per_token"]
        r["mfu"] = achieved / peak if peak else None
        r["mfu_of_measured_matmul"] = achieved / (measured * 1e12) if measured else None
        base = by_name.get(r["baseline"], {})
        if "tokens_per_s_per_gpu" in base:
            r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    ran = [r for r in result["rows"] if "tokens_per_s_per_gpu" in r and r["gpus"] == 1]
    peers = {
        p: max((r for r in ran if r["peer"] == p), key=lambda r: r["tokens_per_s_per_gpu"], default=None)
        for p in ("P1", "P2", "P3")
    }
    ours = [
        r for r in ran if not r["peer"] and r["batches"] == "packed" and not r["adapter"] and r["optim"] == "adamw_torch_fused"
    ]
    best = max(ours, key=lambda r: r["tokens_per_s_per_gpu"], default=None)
    summary: dict[str, Any] = {"best_recipe": best["case"] if best else None}
    fastest_peer = max((r for r in peers.values() if r), key=lambda r: r["tokens_per_s_per_gpu"], default=None)
    if fastest_peer is not None:
        for r in ran:
            r["vs_fastest_peer"] = r["tokens_per_s_per_gpu"] / fastest_peer["tokens_per_s_per_gpu"]
    if best:
        summary["best_mfu"] = best["mfu"]
        if fastest_peer:
            summary["fastest_peer"] = fastest_peer["case"]
            summary["best_vs_fastest_peer"] = best["tokens_per_s_per_gpu"] / fastest_peer["tokens_per_s_per_gpu"]
        if peers["P1"]:
            summary["best_vs_P1"] = best["tokens_per_s_per_gpu"] / peers["P1"]["tokens_per_s_per_gpu"]
        if fastest_peer:  # bf16 and float8 apart: each against the fastest peer, in speed and in memory
            for kind, fp8 in (("bf16", False), ("float8", True)):
                top = max((r for r in ours if r["fp8"] == fp8), key=lambda r: r["tokens_per_s_per_gpu"], default=None)
                if top:
                    summary[f"best_{kind}"] = top["case"]
                    summary[f"best_{kind}_vs_fastest_peer"] = top["vs_fastest_peer"]
                    if "peak_allocated_gib" in top and "peak_allocated_gib" in fastest_peer:
                        summary[f"best_{kind}_memory_vs_fastest_peer"] = (
                            top["peak_allocated_gib"] / fastest_peer["peak_allocated_gib"]
                        )
    result["summary"] = summary


def suffixed(stem: Path, suffix: str) -> Path:
    """stem + suffix; not `with_suffix`, which would turn results/llama-3.2-1b into results/llama-3.json."""
    return stem.with_name(stem.name + suffix)


def fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def write_outputs(result: dict[str, Any], stem: Path, quiet: bool = False) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    suffixed(stem, ".json").write_text(json.dumps(result, indent=2) + "\n")
    v = result["versions"]
    lines = [
        f"{result['device']} ({result['gpu_count']} GPU(s) on the machine), {result['date']}; `{result['model']}` "
        f"(vocabulary {result.get('vocab_size', '?')}), "
        f"{result['data_dir']}, T = {result['seq_len']}, {'bf16 mixed precision' if result['gpu_count'] else 'float32'}, {result['steps']} measured steps after "
        f"{result['warmup']} warm-up; measured bf16 matmul {fmt(result['matmul_tflops'], '.0f')} TFLOP/s; "
        + ", ".join(f"{k} {val}" for k, val in v.items()),
        *([f"\n{result['note']}"] if result.get("note") else []),
        "",
        "| case | micro-batch (rows) | tokens/s per GPU | vs fastest peer | MFU (datasheet) | MFU (measured matmul) "
        "| step (s) | peak alloc / reserved (GiB) | scaling | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "tokens_per_s_per_gpu" not in r:
            lines.append(
                f"| {r['case']} | | {'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r.get('error', '')} | | | | | | | |"
            )
            continue
        mem = (
            f"{fmt(r.get('peak_allocated_gib'), '.1f')} / {fmt(r.get('peak_reserved_gib'), '.1f')}"
            if "peak_allocated_gib" in r
            else "n/a (CPU)"
        )
        lines.append(
            f"| {r['case']} | {r['micro_batch']} | {r['tokens_per_s_per_gpu']:,.0f} | {fmt(r.get('vs_fastest_peer'), '.2f')} "
            f"| {fmt(r['mfu'], '.1%')} "
            f"| {fmt(r['mfu_of_measured_matmul'], '.1%')} | {fmt(r.get('step_time_s'), '.3f')} | {mem} "
            f"| {fmt(r.get('scaling_efficiency'), '.1%')} | {fmt(r.get('loss'), '.3f')} |"
        )
    s = result["summary"]
    if s.get("best_recipe"):
        lines += [
            "",
            f"Best recipe with documents isolated: **{s['best_recipe']}**, MFU {fmt(s.get('best_mfu'), '.1%')}, "
            f"{fmt(s.get('best_vs_fastest_peer'), '.2f')}x the fastest peer ({s.get('fastest_peer')}), "
            f"{fmt(s.get('best_vs_P1'), '.2f')}x P1.",
        ]
    profiled = [r for r in result["rows"] if r.get("profile")]
    if profiled:
        lines += [
            "",
            "Where a step's time goes (ms per step, torch.profiler over the steps after the measured ones; GPU kernel "
            "time by bucket, GPU idle = step - GPU busy; syncs: host-device synchronisations per step):",
            "",
            f"| case | step | {' | '.join(BUCKETS)} | GPU idle | syncs | data loading | graph breaks |",
            "|---|" + "---|" * (len(BUCKETS) + 5),
        ]
        for r in profiled:
            p = r["profile"]
            buckets = " | ".join(f"{p['gpu_ms'][b]:.1f}" for b in BUCKETS)
            lines.append(
                f"| {r['case']} | {p['step_ms']:.1f} | {buckets} "
                f"| {p['gpu_idle_ms']:.1f} | {p['host_syncs']:g} | {p['data_loading_ms']:.1f} | {r.get('graph_breaks', '')} |"
            )
    suffixed(stem, ".md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))
    plot(result, suffixed(stem, ".png"))


def plot(result: dict[str, Any], path: Path) -> None:
    rows = [r for r in result["rows"] if "tokens_per_s_per_gpu" in r]
    if not rows:
        return
    names = [r["case"] for r in rows]
    colors = ["tab:grey" if r["peer"] else "tab:blue" if r["gpus"] == 1 else "tab:green" for r in rows]
    fig, (ax_t, ax_m) = subplots(1, 2, figsize=(14, 0.45 * len(rows) + 1.5), sharey=True)
    ax_t.barh(names, [r["tokens_per_s_per_gpu"] for r in rows], color=colors)
    ax_t.set(xlabel="tokens/s per GPU (real tokens)")
    ax_m.barh(names, [r.get("peak_allocated_gib", 0) for r in rows], color=colors)
    ax_m.set(xlabel="peak allocated memory per GPU (GiB)")
    ax_t.invert_yaxis()
    fig.suptitle(f"{result['device']}, `{result['model']}`, T = {result['seq_len']} (grey: peers)")
    save_figure(fig, path)


def main() -> None:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    args.model = args.model or ("tiny" if args.smoke else "1b")
    if args.list:
        print("\n".join(c.name for c in CASES))
        return
    big = args.big_batch or (
        16 if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 100 * 2**30 else 12
    )
    named = {c.name: replace(c, micro_batch=2 if args.smoke else big if c.big_batch else c.micro_batch) for c in CASES}
    if args.run_case:
        row = measure_case(named[args.run_case], args)
        if PartialState().is_main_process:
            Path(args.result).write_text(json.dumps(row))
        return

    tokens = [n.strip() for n in args.cases.split(",") if n.strip()] or (SMOKE if args.smoke else list(named))
    if unknown := [t for t in tokens if not any(n == t or n.startswith(t) for n in named)]:
        raise UserError(
            f"unknown case(s) {unknown}; python scripts/benchmarks/throughput.py --list shows the names (a prefix selects several)"
        )
    wanted = [n for t in tokens for n in ([t] if t in named else [n for n in named if n.startswith(t)])]
    data_dir = "data/synthetic" if args.smoke else args.data_dir
    if not (Path(data_dir) / "info.json").exists() and not args.smoke:
        raise UserError(
            f"no prepared data in {data_dir}; run: python scripts/prepare_datasets.py --dataset synthetic-long "
            f"--num_examples 2000 --max_length 2048 --output_dir {data_dir}"
        )
    args.data_dir = data_dir
    if args.smoke:
        args.seq_len, args.steps, args.warmup = 256, 3, 1
    stem = Path(args.output) if args.output else output_dir("throughput", args.smoke) / "benchmark"
    previous = json.loads(suffixed(stem, ".json").read_text()) if args.append and suffixed(stem, ".json").exists() else None
    measured_on = machine(*VERSIONS)
    device = measured_on["device"]
    if previous and previous["device"] != device:
        raise UserError(f"--append: {stem}.json was measured on {previous['device']}, this is {device}; ratios need one machine")
    if previous and previous["model"] != args.model:
        raise UserError(f"--append: {stem}.json was measured on the model {previous['model']}, not {args.model}")
    config = model_config(args.model, load_prepared(data_dir).tokenizer)
    fpt = shape_flops_per_token(config, args.seq_len)
    keys = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    keys += ["num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings", "rope_parameters"]
    kept = [r for r in (previous or {}).get("rows", []) if r["case"] not in wanted]
    result = {
        "device": device,
        "gpu_count": measured_on["gpu_count"],
        "model": args.model,
        "vocab_size": config.vocab_size,
        "model_config": {k: getattr(config, k, None) for k in keys},
        "data_dir": args.data_dir,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "date": measured_on["date"],
        "matmul_tflops": (previous or {}).get("matmul_tflops") or matmul_tflops(),
        "versions": measured_on["versions"],
    }
    rows: list[dict[str, Any]] = []
    order = {c.name: i for i, c in enumerate(CASES)}
    for name in wanted:  # the files are rewritten after every case: a stopped run keeps what it measured
        rows += run_matrix(args, [named[name]], fpt)
        result["rows"] = sorted(kept + rows, key=lambda r: order.get(r["case"], len(order)))
        summarize(result)
        write_outputs(result, stem, quiet=name != wanted[-1])


if __name__ == "__main__":
    main()
