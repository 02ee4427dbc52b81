"""Per-GPU peak memory and tokens/s of DDP, FSDP, ZeRO-3, FSDP + LoRA and FSDP + QLoRA on 2 GPUs.

Each case is the example script itself, launched in a fresh process group exactly as its
README row says, on the same model, data and per-GPU batch; the numbers come from each
run's metrics.json. Writes results/sharded/sharded.json (device, versions, date) and
results/sharded/sharded.md.

    python scripts/prepare_datasets.py --dataset synthetic-long --num_examples 1000 --max_length 2048
    python scripts/benchmarks/sharded.py --model 1b --data_dir data/synthetic-long
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser

from hftrain.cli import free_port, worker_error
from hftrain.reporting import package_versions

ROOT = Path(__file__).resolve().parents[2]
CASES = {  # name: (accelerate config, script)
    "DDP": ("accelerate_config.yaml", "trainer/getting_started.py"),
    "FSDP2": ("accelerate_config_fsdp.yaml", "trainer/sharded/fsdp.py"),
    "ZeRO-3": ("accelerate_config.yaml", "trainer/sharded/zero.py"),
    "FSDP2 + LoRA": ("accelerate_config_fsdp_lora.yaml", "trainer/sharded/fsdp_lora.py"),
    "FSDP2 + QLoRA": ("accelerate_config_fsdp_qlora.yaml", "trainer/sharded/fsdp_qlora.py"),
}


@dataclass
class Args:
    model: str = field(default="1b", metadata={"help": "Preset or checkpoint, the same for every case."})
    data_dir: str = field(default="data/synthetic-long", metadata={"help": "Prepared data (long documents)."})
    num_processes: int = field(default=2, metadata={"help": "GPUs per case."})
    batch_size: int = field(default=8, metadata={"help": "Per-GPU micro-batch, the same for every case."})
    steps: int = field(default=40, metadata={"help": "Optimizer steps per case (the first includes warm-up)."})
    cases: str = field(default=",".join(CASES), metadata={"help": "Comma-separated subset of: " + ", ".join(CASES)})
    output: str = field(default="results/sharded/sharded", metadata={"help": "Path stem of the .json and .md written."})


def write(args: Args, rows: list[dict]) -> None:
    versions = package_versions("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": args.num_processes,
        "model": args.model,
        "data_dir": args.data_dir,
        "per_gpu_batch": args.batch_size,
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "rows": rows,
    }
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
            lines.append(f"| {r['case']} | failed: {r['error']} | | | |")
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(
                f"| {r['case']} | {r['train_tokens_per_second_per_device']:,.0f} | {r['peak_memory_gib']:.1f} | {mfu} | {r['train_loss']:.3f} |"
            )
    Path(f"{args.output}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    rows: list[dict] = []
    # The scripts import the project's package from scripts/, installed (pip install -e .) or not.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            config, script = CASES[name]
            out = Path(tmp) / name.replace(" ", "").replace("+", "_")
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / config),
                "--main_process_port",
                str(free_port()),  # a fresh port per case: a lingering process (or another job) cannot block it
                "--num_processes",
                str(args.num_processes),
                str(ROOT / "scripts" / script),
                "--model",
                args.model,
                "--data_dir",
                args.data_dir,
                "--output_dir",
                str(out),
                "--max_steps",
                str(args.steps),
                "--per_device_train_batch_size",
                str(args.batch_size),
                "--per_device_eval_batch_size",
                str(args.batch_size),
                "--eval_strategy",
                "no",
                "--save_strategy",
                "no",
                "--logging_steps",
                "5",
                "--learning_rate",
                "1e-4",
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            row = {"case": name, "config": config, "script": script, "wall_s": round(time.perf_counter() - start, 1)}
            if proc.returncode != 0:
                row["error"] = worker_error(proc.stderr, proc.returncode)
                print(proc.stderr[-6000:], file=sys.stderr)
            else:
                m = json.loads((out / "metrics.json").read_text())
                row.update(
                    {
                        k: m.get(k)
                        for k in (
                            "train_tokens_per_second_per_device",
                            "peak_memory_gib",
                            "mfu",
                            "train_loss",
                            "eval_accuracy",
                            "num_devices",
                            "steps",
                        )
                    }
                )
            print(row, flush=True)
            rows.append(row)
            write(args, rows)  # after every case: a run cut short keeps what it measured
    print(Path(f"{args.output}.md").read_text())


if __name__ == "__main__":
    main()
