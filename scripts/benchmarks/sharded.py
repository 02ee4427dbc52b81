"""Per-GPU peak memory and tokens/s of DDP, FSDP, ZeRO-3, FSDP + LoRA and FSDP + QLoRA on 2 GPUs.

Each case is the example script itself, launched in a fresh process group exactly as its
README row says, on the same model, data and per-GPU batch; the numbers come from each
run's metrics.json. Writes results/sharded/sharded.json (device, versions, date) and
results/sharded/sharded.md.

    python scripts/prepare_datasets.py --dataset synthetic-long --num_examples 1000 --max_length 2048
    python scripts/benchmarks/sharded.py --model 1b --data_dir data/synthetic-long   # (invoke bench-sharded)
    python scripts/benchmarks/sharded.py --smoke   # CPU: DDP over 2 gloo processes, tiny preset, to check the harness
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from hftrain.benchmarking import case_env, example_command, machine, output_dir, run_case, trainer_flags
from hftrain.data import DEFAULT_DATA_DIR
from hftrain.errors import UserError

CASES = {  # name: (accelerate config, script)
    "DDP": ("accelerate_config.yaml", "trainer/getting_started.py"),
    "FSDP2": ("accelerate_config_fsdp.yaml", "trainer/sharded/fsdp.py"),
    "ZeRO-3": ("accelerate_config.yaml", "trainer/sharded/zero.py"),
    "FSDP2 + LoRA": ("accelerate_config_fsdp_lora.yaml", "trainer/sharded/fsdp_lora.py"),
    "FSDP2 + QLoRA": ("accelerate_config_fsdp_qlora.yaml", "trainer/sharded/fsdp_qlora.py"),
}
# What each row keeps of the run's metrics.json.
KEPT = ("train_tokens_per_second_per_device", "peak_memory_gib", "mfu", "train_loss", "eval_accuracy", "num_devices", "steps")


@dataclass
class Args:
    model: str = field(default="1b", metadata={"help": "Preset or checkpoint, the same for every case."})
    data_dir: str = field(default="data/synthetic-long", metadata={"help": "Prepared data (long documents)."})
    num_processes: int = field(default=2, metadata={"help": "GPUs per case."})
    batch_size: int = field(default=8, metadata={"help": "Per-GPU micro-batch, the same for every case."})
    steps: int = field(default=40, metadata={"help": "Optimizer steps per case (the first includes warm-up)."})
    cases: str = field(default=",".join(CASES), metadata={"help": "Comma-separated subset of: " + ", ".join(CASES)})
    case_timeout: int = field(default=1800, metadata={"help": "Seconds before a case is stopped and reported as failed."})
    smoke: bool = field(
        default=False,
        metadata={"help": "CPU check of the harness: DDP over 2 gloo processes, tiny preset, default data, 3 steps."},
    )
    output: str = field(
        default="",
        metadata={"help": "Path stem of the .json and .md (default: results/sharded/sharded; --smoke: under output/)."},
    )


def write(args: Args, head: dict[str, Any], rows: list[dict]) -> None:
    result: dict[str, Any] = {
        **head,
        "gpus": args.num_processes,
        "model": args.model,
        "data_dir": args.data_dir,
        "per_gpu_batch": args.batch_size,
        "steps": args.steps,
        "rows": rows,
    }
    versions = result["versions"]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{args.num_processes} x {result['device']}, `{args.model}` preset, {args.data_dir}, per-GPU batch {args.batch_size}, "
        f"{args.steps} steps, {result['date']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        "| case | tokens/s per GPU | peak memory per GPU (GiB) | MFU | train loss |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'].replace('|', '/')} | | | |")
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(
                f"| {r['case']} | {r['train_tokens_per_second_per_device']:,.0f} | {r['peak_memory_gib']:.1f} | {mfu} | {r['train_loss']:.3f} |"
            )
    Path(f"{args.output}.md").write_text("\n".join(lines) + "\n")


def launch(args: Args, config: str, script: str, out: Path) -> list[str]:
    """The example as its README row launches it, with the settings every case shares."""
    cmd = example_command(script, [], config, args.num_processes)
    if args.smoke:  # CPU: float32, as every example there (an accelerate option: before the script)
        cmd[-1:-1] = ["--mixed_precision", "no"]
    return cmd + trainer_flags(args.model, args.data_dir, out, args.steps, min(5, args.steps), args.batch_size)


def main() -> None:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    if unknown := [n for n in names if n not in CASES]:
        raise UserError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    env = case_env(one_gpu=False)
    if args.smoke:
        args.model, args.data_dir, args.num_processes, args.batch_size, args.steps = "tiny", DEFAULT_DATA_DIR, 2, 32, 3
        names = ["DDP"]
        env |= {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # gloo DDP, one thread per process
    args.output = args.output or str(output_dir("sharded", args.smoke) / "sharded")
    head = machine("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            config, script = CASES[name]
            out = Path(tmp) / name.replace(" ", "").replace("+", "_")
            measured = run_case(name, launch(args, config, script, out), env, out / "metrics.json", args.case_timeout)
            row = {"case": name, "config": config, "script": script, "wall_s": measured["wall_s"]}
            row |= {"error": measured["error"]} if "error" in measured else {k: measured.get(k) for k in KEPT}
            print(row, flush=True)
            rows.append(row)
            write(args, head, rows)  # after every case: a run cut short keeps what it measured
    print(Path(f"{args.output}.md").read_text())
    if failed := [r["case"] for r in rows if "error" in r]:
        raise SystemExit(f"error: {len(failed)} case(s) failed: {', '.join(failed)} (their output is above)")


if __name__ == "__main__":
    main()
