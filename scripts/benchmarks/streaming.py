"""--streaming on a corpus larger than memory, against prepared data: peak memory, time to the first step, tokens/s.

Writes a generated text corpus of `--corpus_gb` GB (paragraphs of the synthetic reviews) into a temporary folder
(after checking the free disk), trains `scripts/trainer/getting_started.py --streaming` on it with the `tiny` preset
and a real tokenizer, then prepares a slice of the same text (`prepare_datasets.py --sample_by paragraph`, the
blocks a stream gives) and trains on that the same way; the temporary folder is deleted at the end. Per case: peak
resident memory of the training process, seconds from its start to the end of its first optimizer step, training
tokens/s (the examples' ThroughputCallback); for the prepared path also the time to prepare, per GB of text.

    python scripts/benchmarks/streaming.py --tokenizer $(python tests/real_checkpoint.py)   # ~10 min on 2 CPU cores
    python scripts/benchmarks/streaming.py --tokenizer <folder> --smoke                    # 20 MB, a few steps

Writes results/streaming/streaming.json (machine, load average, settings, every number) and streaming.md.
Docs: https://huggingface.co/docs/datasets/stream
"""

import hftrain.quiet  # noqa: F401  (first: drops library start-up lines a user cannot act on)

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from hftrain import task
from hftrain.benchmarking import SCRIPTS, case_env, machine, output_dir


@dataclass
class Arguments:
    tokenizer: str = field(metadata={"help": "A real tokenizer folder (python tests/real_checkpoint.py prints one)."})
    corpus_gb: float = field(default=2.0, metadata={"help": "Size of the generated corpus, GB (10^9 bytes)."})
    prepared_mb: float = field(default=20.0, metadata={"help": "The slice of the corpus prepared for the prepared path, MB."})
    block_size: int = field(default=256, metadata={"help": "Tokens per block, both paths."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per step, both paths."})
    max_steps: int = field(default=30, metadata={"help": "Optimizer steps per training run."})
    workdir: str | None = field(default=None, metadata={"help": "Where the temporary folder goes (default: the system's)."})
    output_dir: str = field(default="", metadata={"help": "Default results/streaming (--smoke: output/benchmarks/...)."})
    smoke: bool = field(default=False, metadata={"help": "A 20 MB corpus and 4 steps: checks the harness, measures nothing."})


def write_corpus(path: Path, size: int, seed: int = 0) -> int:
    """Paragraphs of reviews (80 columns), shuffled from a pool, until the file holds `size` bytes; returns its size."""
    rng = random.Random(seed)
    pool = [textwrap.fill(d, 80) for d in task.make_documents(2000, seed, min_reviews=2, max_reviews=12)]
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < size:
            chunk = "\n\n".join(rng.choices(pool, k=1000)) + "\n\n"
            f.write(chunk)
            written += len(chunk.encode())
    return written


def head_of(corpus: Path, target: Path, size: int) -> None:
    """The corpus's first `size` bytes, cut at a paragraph's end."""
    with corpus.open("rb") as f:
        data = f.read(size)
    target.write_bytes(data[: data.rfind(b"\n\n") + 2])


def train(name: str, extra: list[str], args: Arguments, out: Path) -> dict[str, Any]:
    """One getting_started.py run in a fresh process: its metrics, and the seconds to its first logged step."""
    cmd = [sys.executable, str(SCRIPTS / "trainer/getting_started.py"), "--model", "tiny", *extra]
    cmd += ["--output_dir", str(out / name), "--max_steps", str(args.max_steps), "--logging_steps", "1"]
    cmd += ["--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "4"]
    cmd += ["--warmup_steps", "0", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none"]
    start = time.perf_counter()
    first_step, lines = None, []
    with subprocess.Popen(cmd, env=case_env(True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # the Trainer prints a row after each step (--logging_steps 1)
            lines.append(line)
            if first_step is None and "'loss'" in line:
                first_step = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{''.join(lines)[-4000:]}")
    metrics = json.loads((out / name / "metrics.json").read_text())
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "first_step_s": round(first_step or float("nan"), 1),
        "peak_rss_gib": metrics["peak_memory_gib"],
        "train_tokens_per_second": metrics["train_tokens_per_second"],
        "steps": metrics["steps"],
    }


def main() -> None:
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    if args.smoke:
        args.corpus_gb, args.prepared_mb, args.max_steps = 0.02, 5.0, 4
    size = int(args.corpus_gb * 1e9)
    parent = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < 1.3 * size + 2e9:
        raise SystemExit(f"{parent} has {free / 1e9:.1f} GB free; the corpus needs {size / 1e9:.1f} GB and some room")
    tmp = Path(tempfile.mkdtemp(prefix="streaming-bench-", dir=parent))  # made here, deleted at the end
    result: dict[str, Any] = {**machine("torch", "transformers", "datasets", "tokenizers"), "settings": asdict(args)}
    result["cpu_count"], result["load_average_start"] = os.cpu_count(), os.getloadavg()
    try:
        corpus = tmp / "corpus.txt"
        start = time.perf_counter()
        result["corpus_bytes"] = write_corpus(corpus, size)
        result["corpus_write_s"] = round(time.perf_counter() - start, 1)
        shape = ["--tokenizer", args.tokenizer, "--block_size", str(args.block_size)]
        result["streaming"] = train("streaming", ["--streaming", "--dataset", str(corpus), *shape], args, tmp)
        sliced = tmp / "slice.txt"
        head_of(corpus, sliced, int(args.prepared_mb * 1e6))
        prepare = [sys.executable, str(SCRIPTS / "prepare_datasets.py"), "--dataset", str(sliced), "--output_dir"]
        prepare += [str(tmp / "prepared-data"), "--tokenizer", args.tokenizer, "--sample_by", "paragraph"]
        prepare += ["--block_size", str(args.block_size), "--test_size", "0.01"]
        start = time.perf_counter()
        subprocess.run(prepare, env=case_env(True), check=True, capture_output=True)
        seconds = time.perf_counter() - start
        result["prepare"] = {
            "text_bytes": sliced.stat().st_size,
            "seconds": round(seconds, 1),
            "seconds_per_gb": round(seconds / (sliced.stat().st_size / 1e9), 1),
            "disk_bytes": sum(p.stat().st_size for p in (tmp / "prepared-data").rglob("*") if p.is_file()),
        }
        result["prepared"] = train("prepared", ["--data_dir", str(tmp / "prepared-data")], args, tmp)
    finally:
        shutil.rmtree(tmp)
    result["load_average_end"] = os.getloadavg()
    out = output_dir("streaming", args.smoke, args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "streaming.md").write_text(table(result))
    print(table(result))


def table(r: dict[str, Any]) -> str:
    s, p, prep = r["streaming"], r["prepared"], r["prepare"]
    rows = [
        "| path | text | peak resident memory (GiB) | first optimizer step (s) | tokens/s |",
        "|---|---|---:|---:|---:|",
        f"| `--streaming` | {r['corpus_bytes'] / 1e9:.2f} GB | {s['peak_rss_gib']:.2f} | {s['first_step_s']} | "
        f"{s['train_tokens_per_second']:,.0f} |",
        f"| prepared | {prep['text_bytes'] / 1e6:.0f} MB slice | {p['peak_rss_gib']:.2f} | {p['first_step_s']} "
        f"(+ {prep['seconds']} s to prepare: {prep['seconds_per_gb']:,.0f} s per GB) | {p['train_tokens_per_second']:,.0f} |",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
