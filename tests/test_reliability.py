"""Reliability: a run stopped by SIGTERM saves a checkpoint and resumes to the very weights and losses of an
uninterrupted run; a checkpoint cut short by a crash is skipped; save_total_limit bounds the checkpoints.

The signals go to real runs started with Popen: the test waits for a log line of the running training,
then signals, so that the run is mid-training however loaded the machine is. Three Trainer runs (tiny
preset, 60 steps) and two 2-process accelerate runs are shared by the tests through module fixtures.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil  # an accelerate dependency
import pytest
import torch
from safetensors.torch import load_file

from conftest import SCRIPTS, accelerate_cpu, free_port, read_metrics, run_script, script_env, train_losses

GS = "trainer/getting_started.py"
STEPS = 60
# A log row every step, so that every loss is compared; checkpoints every 10 steps, the newest 2 kept.
TRAINER = ["--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "10"]
LOOP = [*TRAINER[:4], "--checkpointing_steps", "10", "--per_device_train_batch_size", "16"]
PREEMPTED = re.compile(
    r"preempted at step (\d+): checkpoint saved in (\S+); resume with the same command and --resume_from_checkpoint latest"
)


def signal_mid_training(
    cmd: list[str], cwd: Path, ready: re.Pattern, times: int = 1, to_worker: str = "", **env: str
) -> tuple[int, str]:
    """Run `cmd`; once `ready` has matched `times` output lines, send one SIGTERM to it (or, with `to_worker` a
    script's path, to the training process of rank 1 that its launcher started); return its exit status and output."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=script_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # text mode splits tqdm's carriage-return updates into lines too
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if ready.search(line):
                times -= 1
                if times == 0:
                    os.kill(worker(proc.pid, to_worker, rank=1) if to_worker else proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:  # on a failure, workers that a launcher started in their own sessions too
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        proc.kill()  # a no-op once it has exited
    return proc.returncode, "".join(lines)


def worker(launcher: int, script: str, rank: int) -> int:
    """The pid of the training process of `rank` under a launcher: the descendant running `script` whose LOCAL_RANK
    is `rank`. Not just "the last child": a launcher may also start helpers (a multiprocessing resource tracker)."""
    for child in psutil.Process(launcher).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if script in child.cmdline() and child.environ().get("LOCAL_RANK") == str(rank):
                return child.pid
    raise AssertionError(f"no process of rank {rank} running {script} under the launcher")


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert a.keys() == b.keys()
    # Same batches in the same order, same RNG, same optimizer and scheduler state: bit-identical on CPU in practice
    # (measured: 0.0 difference). The tolerance only allows for a BLAS that is not deterministic; a lost optimizer
    # state or a different data order moves the weights by ~1e-3 per step (learning rate 3e-3).
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    losses, reference = train_losses(read_metrics(resumed)), train_losses(read_metrics(uninterrupted))
    assert list(losses) == list(reference) == list(range(1, STEPS + 1))  # every step's row, once
    assert losses == pytest.approx(reference, rel=1e-5)
    # metrics.json reports the whole run, not only the part after the resume
    whole, part = read_metrics(uninterrupted), read_metrics(resumed)
    assert part["resumed_from_step"] > 0 and part["train_tokens"] == whole["train_tokens"]
    assert part["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-3)  # from rows rounded to 4 digits


# ---------------------------------------------------------------- Trainer


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    out = workdir / "output/reliability/uninterrupted"
    run_script(GS, *TRAINER, "--output_dir", str(out), cwd=workdir)
    return out


@pytest.fixture(scope="module")
def preempted(workdir):
    """SIGTERM after the 3rd logged step; returns the output folder, exit status, output and the step it stopped at."""
    out = workdir / "output/reliability/preempted"
    cmd = [sys.executable, str(SCRIPTS / GS), *TRAINER, "--output_dir", str(out)]
    status, output = signal_mid_training(cmd, workdir, re.compile(r"^\{'loss': "), times=3)
    match = PREEMPTED.search(output)
    assert match, f"exit status {status}, no preemption message:\n{output[-3000:]}"
    return out, status, output, int(match.group(1)), Path(match.group(2))


def test_sigterm_saves_a_checkpoint_and_exits_143(preempted):
    out, status, output, step, checkpoint = preempted
    assert status == 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM killed
    assert 3 <= step < STEPS and checkpoint == out / f"checkpoint-{step}"
    assert "SIGTERM: saving a checkpoint after this step\n" in output and "Traceback" not in output  # no word of Ctrl-C
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "optimizer.pt").exists()
    # Not a finished run: no final evaluation, model or metrics.json beside the checkpoints.
    assert "eval_loss" not in output and not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()


def test_resumed_after_sigterm_equals_uninterrupted(workdir, preempted, uninterrupted):
    out = preempted[0]
    run_script(GS, *TRAINER, "--output_dir", str(out), "--resume_from_checkpoint", "latest", cwd=workdir)
    assert_same_run(out, uninterrupted)


def test_save_total_limit_bounds_the_checkpoints(uninterrupted):
    assert sorted(p.name for p in uninterrupted.glob("checkpoint-*")) == ["checkpoint-50", "checkpoint-60"]


def test_resume_latest_skips_a_checkpoint_cut_short_by_a_crash(workdir, uninterrupted):
    """The Trainer writes trainer_state.json last: a crash while saving checkpoint-60 leaves it without, its weights
    perhaps truncated. `latest` resumes from checkpoint-50 instead, saying so, and the run ends as if nothing happened."""
    out = workdir / "output/reliability/crashed"
    for name in ("checkpoint-50", "checkpoint-60"):
        shutil.copytree(uninterrupted / name, out / name)
    crashed = out / "checkpoint-60"
    for name in ("trainer_state.json", "rng_state.pth", "scheduler.pt"):
        (crashed / name).unlink()
    os.truncate(crashed / "optimizer.pt", (crashed / "optimizer.pt").stat().st_size // 2)
    proc = run_script(GS, *TRAINER, "--output_dir", str(out), "--resume_from_checkpoint", "latest", cwd=workdir)
    assert f"skipping {crashed}: it has no trainer_state.json" in proc.stdout
    assert f"resuming from {out / 'checkpoint-50'}" in proc.stdout
    assert_same_run(out, uninterrupted)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-50", "checkpoint-60"]
    assert (crashed / "trainer_state.json").exists()  # written again, complete


# ---------------------------------------------------------------- accelerate loop, 2 processes


@pytest.fixture(scope="module")
def loop_preempted(workdir):
    """SIGTERM to ONE of the two processes: the other must stop at the same step (they agree by all-reduce),
    or the checkpoint's save would wait for it forever."""
    out = workdir / "output/reliability/loop"
    port = str(free_port())
    script = str(SCRIPTS / "basic/custom_loop_accelerate.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--main_process_port", port, script, *LOOP, "--output_dir", str(out)]
    ready = re.compile(rf"train: .*\| ([3-9]|[1-5][0-9])/{STEPS} ")  # the progress bar at step 3 or later
    status, output = signal_mid_training(cmd, workdir, ready, to_worker=script, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    match = PREEMPTED.search(output)
    assert match, f"exit status {status}, no preemption message:\n{output[-3000:]}"
    return out, status, output, int(match.group(1))


def test_loop_sigterm_to_one_process_stops_both_at_the_same_step(loop_preempted):
    out, status, output, step = loop_preempted
    assert status != 0 and "exitcode  : 143" in output  # the launcher reports the workers' status as a failure
    assert output.count("SIGTERM: saving a checkpoint") == 1  # only one process got the signal...
    assert 3 <= step < STEPS and output.count("preempted at step") == 1  # ...both stopped (the message: main process)
    checkpoint = out / f"checkpoint-{step}"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    assert not list(out.glob("*.tmp")) and not (out / "metrics.json").exists()
    assert len(list(out.glob("checkpoint-*"))) <= 2  # save_total_limit


def test_loop_resumes_after_sigterm(workdir, loop_preempted):
    out, _, _, step = loop_preempted
    accelerate_cpu(
        "basic/custom_loop_accelerate.py", *LOOP, "--output_dir", str(out), "--resume_from_checkpoint", "latest", cwd=workdir
    )
    metrics = read_metrics(out)
    assert metrics["steps"] == STEPS and list(train_losses(metrics)) == list(range(1, STEPS + 1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-50", "checkpoint-60"]


# ---------------------------------------------------------------- the signal handler itself


def test_second_ctrl_c_stops_at_once_and_repeated_sigterm_is_ignored():
    from hftrain.preemption import Preemption

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    preemption = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher passing the scheduler's SIGTERM on: still saving
        assert preemption.requested() and preemption.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C after that: stop now, as without the handler
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handed back


def test_loop_checkpoints_are_renamed_into_place_and_latest_skips_damaged_ones(tmp_path, capsys):
    """The loops' save: written as checkpoint-N.tmp, renamed when complete, older ones pruned. A half-written .tmp
    folder is never resumed from, nor is a checkpoint whose files were cut short afterwards (a full disk, a copy)."""
    from safetensors.torch import save_file

    from hftrain.checkpoints import ACCELERATE_CHECKPOINT, resolve_checkpoint
    from hftrain.loops import publish_checkpoint

    for step in (10, 20, 30, 40):
        written = tmp_path / f"checkpoint-{step}.tmp"
        written.mkdir()
        save_file({"w": torch.zeros(8)}, written / "model.safetensors")
        torch.save({}, written / "optimizer.bin")
        torch.save({}, written / "random_states_0.pkl")
        (written / "loop_state.json").write_text("{}")
        publish_checkpoint(str(written), str(tmp_path / f"checkpoint-{step}"), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    shutil.copytree(tmp_path / "checkpoint-40", tmp_path / "checkpoint-50.tmp")  # a save in progress
    os.truncate(tmp_path / "checkpoint-40/optimizer.bin", 10)
    assert resolve_checkpoint("latest", str(tmp_path), ACCELERATE_CHECKPOINT) == str(tmp_path / "checkpoint-30")
    assert f"skipping {tmp_path / 'checkpoint-40'}: optimizer.bin is cut short" in capsys.readouterr().out
