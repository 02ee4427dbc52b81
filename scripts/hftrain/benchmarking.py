"""What the benchmark harnesses in `scripts/benchmarks/` share: the record of the machine a table was measured on,
where results go, and the launch of each case in a fresh process.

Every Trainer case is timed by `hftrain.reporting.ThroughputCallback`, the callback the examples report their
tokens/s with (here with a warm-up left out); the GaLore cases train the modules `scripts/trainer/galore.py` trains.
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
