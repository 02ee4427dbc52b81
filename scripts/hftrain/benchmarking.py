"""What the benchmark harnesses in `scripts/benchmarks/` share: the record of the machine a table was measured on,
where results go, the launch of each case in a fresh process, and the reading of an example's own measurements.

A row of ours is the example script itself (`example_command`), run with the flags the row names and the Trainer
settings every row shares (`trainer_flags`); its numbers are the ones the script writes to metrics.json, timed by
`hftrain.reporting.ThroughputCallback` and the Trainer's logged rows (`after_warmup` reads the steps after a warm-up
from them). The GaLore cases train the modules `scripts/trainer/galore.py` trains.
"""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch

from hftrain.launch import first_gpu_only, free_port, worker_error
from hftrain.reporting import device_name, package_versions

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
# The attention and MLP projections, scripts/trainer/galore.py's `optim_target_modules` (the Trainer matches the
# regex with re.fullmatch against module names; tests/test_benchmark.py checks the two agree).
GALORE_TARGET_MODULES = r".*\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def run_date() -> str:
    """The day (UTC, ISO 8601) every results file records beside its numbers."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def machine(*packages: str) -> dict[str, Any]:
    """Device, GPUs, date and versions (Python, CUDA, and each named package): the head of every results file."""
    cuda = torch.cuda.is_available()
    return {
        "device": device_name(),
        "gpu_count": torch.cuda.device_count(),
        "date": run_date(),
        "versions": {
            **package_versions(*packages),
            "cuda": torch.version.cuda or "none",
            **({"cudnn": str(torch.backends.cudnn.version())} if cuda else {}),
        },
    }


def output_dir(harness: str, smoke: bool, chosen: str = "") -> Path:
    """`chosen`, or results/<harness> for a measurement; a smoke run's numbers mean nothing, so they go to
    output/benchmarks/<harness>-smoke and never replace the measured files."""
    return Path(chosen or (f"output/benchmarks/{harness}-smoke" if smoke else f"results/{harness}"))


def case_env(one_gpu: bool) -> dict[str, str]:
    """The environment a case's process runs in: the project's package importable from scripts/ (installed with
    `pip install -e .` or not); a 1-GPU case sees only the first GPU, since a plain process that saw several would
    have the Trainer wrap the model in DataParallel over all of them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return first_gpu_only(env) if one_gpu else env


def accelerate_launch(config: str, num_processes: int) -> list[str]:
    """`accelerate launch` with one of the project's configs, on a fresh port (a lingering process or another job
    cannot block it); the script and its arguments follow."""
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config)),
        *("--num_processes", str(num_processes), "--main_process_port", str(free_port())),
    ]


def example_command(script: str, flags: list[str], config: str = "", num_processes: int = 1) -> list[str]:
    """`python scripts/<script> <flags>`, as the script's docstring launches it; with `config`, under
    `accelerate launch --config_file <config>` on `num_processes` processes."""
    launcher = accelerate_launch(config, num_processes) if config else [sys.executable]
    return [*launcher, str(SCRIPTS / script), *flags]


def trainer_flags(model: str, data_dir: str, output_dir: Path, max_steps: int, logging_steps: int, batch_size: int) -> list[str]:
    """The Trainer flags every launched row shares: the model, data and per-GPU batch, a fixed number of steps, no
    evaluation or checkpoint while training (the example still evaluates and saves once at the end)."""
    return [
        *("--model", model, "--data_dir", data_dir, "--output_dir", str(output_dir)),
        *("--max_steps", str(max_steps), "--logging_steps", str(logging_steps), "--learning_rate", "1e-4"),
        *("--per_device_train_batch_size", str(batch_size), "--per_device_eval_batch_size", str(batch_size)),
        *("--eval_strategy", "no", "--save_strategy", "no"),
    ]


def after_warmup(metrics: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    """tokens/s (all processes together), step time, tokens per step, loss and, on CUDA, peak memory over the `steps`
    steps after `warmup`, read from an example's metrics.json: its logged loss rows carry the Trainer's
    `train_runtime` and `num_input_tokens_seen` (real tokens), and the ThroughputCallback's peak memory since the row
    before. The run must log at step `warmup` and `warmup + steps` (--logging_steps gcd(warmup, steps))."""
    rows = {r["step"]: r for r in metrics["log_history"] if "loss" in r}
    end, measured = rows[warmup + steps], [r for step, r in rows.items() if warmup < step <= warmup + steps]
    start = rows[warmup] if warmup else {"train_runtime": 0.0, "num_input_tokens_seen": 0}
    tokens = end["num_input_tokens_seen"] - start["num_input_tokens_seen"]
    seconds = end["train_runtime"] - start["train_runtime"]
    out = {
        "tokens_per_s": tokens / seconds,
        "step_time_s": seconds / steps,
        "tokens_per_step": tokens / steps,
        "loss": end["loss"],
        "loss_curve": [[step, r["loss"]] for step, r in rows.items() if step <= warmup + steps],
    }
    if "peak_memory_gib" in end:  # CUDA only: the CPU's resident set has no peak to reset
        out["peak_allocated_gib"] = max(r["peak_memory_gib"] for r in measured)
        out["peak_reserved_gib"] = max(r["peak_reserved_gib"] for r in measured)
    return out


class CaseProcess:
    """One case in a fresh process, so no case's cached GPU memory (or compiled state) counts against the next.
    Its numbers come back as the JSON file it writes, read by `result()` with the wall time; a failure comes back
    as the worker's own error in one line."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], result_file: Path, timeout: int) -> None:
        self.name, self.result_file, self.timeout = name, result_file, timeout
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> dict[str, Any]:
        try:
            output, _ = self.proc.communicate(timeout=self.timeout)
            error = (
                None if self.proc.returncode == 0 and self.result_file.exists() else worker_error(output, self.proc.returncode)
            )
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output = self.proc.communicate()[0]
            error = f"stopped after {self.timeout} s"
        row: dict[str, Any] = {"wall_s": round(time.perf_counter() - self.start, 1)}
        if error:
            print(f"--- {self.name} failed; the end of its output:\n{output[-6000:]}", file=sys.stderr, flush=True)
            return {**row, "error": error}
        return {**row, **json.loads(self.result_file.read_text())}


def run_case(name: str, cmd: list[str], env: dict[str, str], result_file: Path, timeout: int) -> dict[str, Any]:
    """`CaseProcess` started and waited for."""
    return CaseProcess(name, cmd, env, result_file, timeout).result()


def subplots(*args: Any, **kwargs: Any) -> Any:
    """`plt.subplots`, drawing for files only (the Agg backend: no window, no display needed)."""
    matplotlib.use("Agg")
    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
