"""Project tasks (invoke): `invoke --list` shows them, `invoke <task> --help` their options."""

from pathlib import Path

from invoke import Context, task


@task
def precommit_install(c: Context) -> None:
    """Install the git pre-commit hooks (ruff, ruff format, mypy on every commit)."""
    c.run("pre-commit install")


@task(aliases=["cc"])
def code_check(c: Context, fix: bool = False) -> None:
    """Lint (ruff), check formatting (ruff format) and types (mypy); --fix rewrites what ruff can."""
    c.run(f"ruff check {'--fix ' if fix else ''}.", pty=False)
    c.run(f"ruff format {'' if fix else '--check '}.", pty=False)
    c.run("mypy", pty=False)


@task
def test(c: Context, k: str = "", x: bool = False) -> None:
    """The CPU test suite (GPU tests are skipped without CUDA), two test files at a time; -k selects tests by name."""
    c.run(f"pytest -n 2 --dist loadfile {'-x ' if x else ''}{f'-k {k!r}' if k else ''}", pty=False)


@task
def test_gpu(c: Context, k: str = "") -> None:
    """Only the GPU tests (`gpu` marker): run on a CUDA machine."""
    c.run(f"pytest -m gpu {f'-k {k!r}' if k else ''}", pty=False)


@task
def prepare(c: Context, dataset: str = "synthetic", tokenizer: str = "", output_dir: str = "") -> None:
    """Prepare data/<name>/ (default: the synthetic rating task)."""
    extra = (f" --tokenizer {tokenizer}" if tokenizer else "") + (f" --output_dir {output_dir}" if output_dir else "")
    c.run(f"python scripts/prepare_datasets.py --dataset {dataset}{extra}", pty=False)


@task
def train(c: Context, script: str = "trainer/getting_started", args: str = "") -> None:
    """Run one example, e.g. invoke train --script trainer/advanced_usage --args "--model small"."""
    c.run(f"python scripts/{script}.py {args}", pty=False)


@task
def bench(c: Context, cases: str = "", smoke: bool = False) -> None:
    """The benchmark matrix (scripts/benchmark.py) on the GPUs here; --smoke checks the harness on CPU."""
    if not smoke and not Path("data/synthetic-long/info.json").exists():
        c.run("python scripts/prepare_datasets.py --dataset synthetic-long --num_examples 2000 --max_length 2048", pty=False)
    c.run(f"python scripts/benchmark.py{' --smoke' if smoke else ''}{f' --cases {cases!r}' if cases else ''}", pty=False)
