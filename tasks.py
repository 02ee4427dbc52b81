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


def run_harness(c: Context, harness: str, smoke: bool, options: str) -> None:
    """python scripts/benchmarks/<harness>.py; a measurement first prepares the long documents it trains on."""
    needs_long_documents = harness in ("throughput", "sharded") and not smoke
    if needs_long_documents and not Path("data/synthetic-long/info.json").exists():
        c.run("python scripts/prepare_datasets.py --dataset synthetic-long --num_examples 2000 --max_length 2048", pty=False)
    c.run(f"python scripts/benchmarks/{harness}.py{' --smoke' if smoke else ''}{f' {options}' if options else ''}", pty=False)


@task
def bench(c: Context, cases: str = "", smoke: bool = False, args: str = "") -> None:
    """Throughput, MFU and peak memory of every technique beside its peers (scripts/benchmarks/throughput.py) on the
    GPUs here, into results/throughput/; --smoke checks the harness on CPU; --args passes more flags."""
    run_harness(c, "throughput", smoke, f"{f'--cases {cases!r} ' if cases else ''}{args}".strip())


@task
def bench_memory(c: Context, cases: str = "", smoke: bool = False, args: str = "") -> None:
    """Peak memory of full AdamW, 8-bit AdamW, GaLore, LoRA and QLoRA on one GPU (scripts/benchmarks/memory.py), into
    results/memory/; --smoke checks the harness on CPU."""
    run_harness(c, "memory", smoke, f"{f'--cases {cases!r} ' if cases else ''}{args}".strip())


@task
def bench_sharded(c: Context, cases: str = "", smoke: bool = False, args: str = "") -> None:
    """DDP, FSDP2, ZeRO-3, FSDP2 + LoRA and FSDP2 + QLoRA, each example launched on 2 GPUs (scripts/benchmarks/sharded.py),
    into results/sharded/; --smoke checks the harness with DDP over 2 CPU processes."""
    run_harness(c, "sharded", smoke, f"{f'--cases {cases!r} ' if cases else ''}{args}".strip())


@task
def bench_attention(c: Context, smoke: bool = False, args: str = "") -> None:
    """Eager, SDPA's kernels and FlashAttention-2 against the sequence length on one GPU (scripts/benchmarks/attention.py),
    into results/attention/; --smoke checks the harness on CPU."""
    run_harness(c, "attention", smoke, args)
