"""Time the quick start's main job as docs/install.md reports it: `python scripts/trainer/getting_started.py` in a
fresh clone (no data/, no output/: data preparation included), in a virtual environment that holds the core
install only (`pip install -e .`, PyTorch's CPU build first), on this machine as it is.

    python3 results/quickstart/measure.py --runs 3 > results/quickstart/raw-<date>.txt
    python3 results/quickstart/measure.py --venv /path/to/existing/venv     # skip the install (its packages as they are)

Each run records the wall time with the load average before and after it (a busy machine makes the wall time
longer; the CPU time, user + sys, moves less), and the time its imports take (`python -X importtime` over the
script's own import lines, apart from the runs: the top-level packages by cumulative time). Not a test: a
measurement, kept with its raw output beside the table that quotes it.
"""

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "scripts/trainer/getting_started.py"


def sh(*cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def fresh_clone(work: Path) -> Path:
    """A clone of this repository's committed HEAD: no data/, output/ or caches of earlier runs."""
    clone = work / "clone"
    sh("git", "clone", "-q", str(ROOT), str(clone))
    print(f"commit {sh('git', 'rev-parse', 'HEAD', cwd=clone).strip()}")
    return clone


def install(clone: Path) -> Path:
    """The quick start's install: torch's CPU build first (as CI does: the build this machine holds), then the core."""
    venv = clone / ".venv"
    sh(sys.executable, "-m", "venv", str(venv))
    pip = str(venv / "bin" / "pip")
    t0 = time.perf_counter()
    sh(pip, "install", "-q", "torch==2.13.0")
    sh(pip, "install", "-q", "-e", str(clone))
    print(f"install: {time.perf_counter() - t0:.1f} s")
    return venv


def import_times(python: str, clone: Path) -> None:
    """`-X importtime` over the script's import lines: the total, and each top-level package's cumulative share."""
    lines = [
        line
        for line in (clone / SCRIPT).read_text().splitlines()
        if re.match(r"(import|from) \S+", line) and "__future__" not in line
    ]
    env = {**os.environ, "PYTHONPATH": str(clone / "scripts")}
    import_cpu(python, clone, lines)
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", "\n".join(lines)], cwd=clone, env=env, capture_output=True, text=True
    )
    rows = [re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line) for line in proc.stderr.splitlines()]
    top = sorted(((int(m.group(2)), m.group(4)) for m in rows if m and len(m.group(3)) == 1), reverse=True)
    print(f"imports (-X importtime, the script's import lines): {sum(us for us, _ in top) / 1e6:.2f} s")
    for us, name in top[:12]:
        print(f"    {us / 1e6:6.2f} s  {name}")
    optional = ("trl", "deepspeed", "bitsandbytes", "torchao", "galore_torch", "liger_kernel", "peft")
    check = "\n".join([*lines, "import sys", f"print(*[n for n in {optional!r} if n in sys.modules])"])
    loaded = subprocess.run([python, "-c", check], cwd=clone, env=env, capture_output=True, text=True).stdout.split()
    for name in optional:
        cumulative = next((int(m.group(2)) for m in rows if m and m.group(4) == name), 0)
        print(f"    {name}: {f'imported ({cumulative / 1e6:.2f} s cumulative)' if name in loaded else 'not imported'}")


def import_cpu(python: str, clone: Path, lines: list[str], repeats: int = 3) -> None:
    """CPU seconds (user + sys, least of `repeats`) of torch and the Trainer alone, and of the script's import lines:
    the difference is what the project's own modules add. CPU time moves less than wall time on a busy machine."""
    env = {**os.environ, "PYTHONPATH": str(clone / "scripts")}
    usage = "import resource\nr = resource.getrusage(resource.RUSAGE_SELF)\nprint(r.ru_utime + r.ru_stime)"

    def cpu(code: str) -> float:
        runs = [
            subprocess.run([python, "-c", f"{code}\n{usage}"], cwd=clone, env=env, capture_output=True, text=True)
            for _ in range(repeats)
        ]
        return min(float(run.stdout.split()[-1]) for run in runs)

    trainer = cpu("import torch\nfrom transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed")
    script = cpu("\n".join(lines))
    print(
        f"imports, CPU time: torch + the Trainer {trainer:.2f} s, the script's import lines {script:.2f} s (the project's modules add {script - trainer:.2f} s)"
    )


def run_once(python: str, clone: Path) -> None:
    for folder in ("data", "output"):
        shutil.rmtree(clone / folder, ignore_errors=True)
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([python, SCRIPT], cwd=clone, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_user, cpu_sys = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    done = next((line for line in proc.stdout.splitlines() if line.startswith("done:")), f"exit {proc.returncode}")
    print(
        f"run: {wall:.1f} s wall, {cpu_user:.1f} s user + {cpu_sys:.1f} s sys, load average {load_before:.2f} before / "
        f"{os.getloadavg()[0]:.2f} after | {done}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--venv", help="an existing virtual environment to use instead of a fresh install")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as work:
        clone = fresh_clone(Path(work))
        venv = Path(args.venv) if args.venv else install(clone)
        python = str(venv / "bin" / "python")
        print(
            sh(
                python,
                "-c",
                "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)",
            ).strip()
        )
        import_times(python, clone)
        for _ in range(args.runs):
            run_once(python, clone)


if __name__ == "__main__":
    main()
