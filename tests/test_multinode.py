"""Several machines, simulated on this one: two launchers with machine ranks 0 and 1 meet over 127.0.0.1 (gloo),
one training process each, exactly as two machines meet over their network. They train like one machine with
the same global batch, and when one machine dies the other stops with an error and the run resumes from the
last checkpoint. Also: the configs and launch files take the multi-machine flags, and two machines preparing
the data in one shared folder at once keep one complete copy.

Runs are shared through module fixtures: one single-machine reference, one two-machine DDP run (also the
uninterrupted run the resumed one is compared with), one two-machine ZeRO-3 run, one killed run and its resume.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, SCRIPTS, free_port, read_metrics, run_script, script_env, tail, train_losses

STEPS = 60  # long enough that a kill after the first checkpoint (step 20) lands mid-run
COMMON = ["--max_steps", str(STEPS), "--logging_steps", "5", "--eval_strategy", "no", "--save_strategy", "no"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two processes on a shared 2-core machine
LAUNCH_TIMEOUT = 300
# How long the surviving machine may take to stop after its peer was killed. Measured on this stack: ~2 s (gloo
# sees the dead peer's connection reset at the next all-reduce); the margin is for a loaded CI machine.
SURVIVOR_TIMEOUT = 60


def accelerate_machine(rank: int, port: int, script: str, *args: str) -> list[str]:
    """`accelerate launch` as machine `rank` of two, one process per machine, as README "Several machines" shows."""
    flags = ["--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"]
    flags += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, str(SCRIPTS / script), *args]


def start(cmd: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    # Its own session: a test kill reaches this machine's processes only.
    return subprocess.Popen(
        cmd, cwd=cwd, env=script_env(**ONE_THREAD, **env), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def run_machines(cmds: list[list[str]], cwd: Path, name: str, **env: str) -> None:
    """Start every machine's launcher at once and wait for all; on failure show each machine's output. One failed
    machine fails the run at once: the other launchers would wait up to 300 s at torch elastic's exit barrier."""
    logs = [cwd / f"{name}-machine{rank}.log" for rank in range(len(cmds))]
    procs = [start(cmd, cwd, log, **env) for cmd, log in zip(cmds, logs)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        codes = [p.poll() for p in procs]  # None: still running when stopped
    finally:
        for p in procs:
            if p.poll() is None:
                kill_machine(p)
    if codes != [0] * len(procs):
        outputs = "\n".join(f"--- {log.name}\n{log_tail(log)}" for log in logs)
        pytest.fail(f"{name}: launchers exited {codes}\n{outputs}")


def log_tail(log: Path) -> str:
    return tail(log.read_text(errors="replace"), 4000)


def kill_machine(launcher: subprocess.Popen) -> None:
    """SIGKILL a machine's launcher and every process under it, as when the machine dies. (torchrun starts the
    training processes in sessions of their own, so killing the launcher's process group would miss them.)"""
    try:
        procs = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # it may have ended meanwhile
            proc.kill()
    launcher.wait()


@pytest.fixture(scope="module")
def single_machine(workdir, start_checkpoint):
    out = workdir / "output/multinode/single"
    run_script(
        "trainer/getting_started.py",
        *COMMON,
        "--model",
        start_checkpoint,
        "--per_device_train_batch_size",
        "32",
        "--per_device_eval_batch_size",
        "60",
        "--output_dir",
        str(out),
        cwd=workdir,
        **ONE_THREAD,
    )
    return read_metrics(out)


# 2 machines x 16 = the reference's 32 examples per step; evaluation likewise, 2 x 30 = 60 (600 test examples:
# 10 full global batches, none padded).
PER_MACHINE = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "30"]
DDP_ARGS = [*COMMON, *PER_MACHINE, "--use_cpu"]


@pytest.fixture(scope="module")
def two_machine_ddp(workdir, start_checkpoint):
    out = workdir / "output/multinode/ddp"
    args = [*DDP_ARGS, "--model", start_checkpoint, "--output_dir", str(out)]
    port = free_port()
    cmds = [accelerate_machine(rank, port, "trainer/getting_started.py", *args) for rank in (0, 1)]
    run_machines(cmds, workdir, "ddp", ACCELERATE_USE_CPU="true")
    return read_metrics(out)


def test_ddp_on_two_machines_matches_one_machine(single_machine, two_machine_ddp):
    assert two_machine_ddp["num_devices"] == 2 and single_machine["num_devices"] == 1
    # The same start and global batches (2 machines x 16 = 32): only the order of float sums differs (measured
    # ~1e-7 relative), as between 2 processes on one machine (tests/test_trainer.py uses the same 1e-4).
    assert train_losses(two_machine_ddp) == pytest.approx(train_losses(single_machine), rel=1e-4)
    assert len(train_losses(two_machine_ddp)) == STEPS // 5
    # Evaluation gathers both machines' shares. The Trainer's eval loss averages the per-token loss of each global
    # eval batch (tokens counted across machines); with the same global batches (2 x 30 and 1 x 60) it is the single
    # machine's to float noise (measured 1e-7). Machine 0's share alone would be 2.6e-3 off.
    assert two_machine_ddp["eval_loss"] == pytest.approx(single_machine["eval_loss"], rel=1e-5)


def test_zero3_on_two_machines_matches_one_machine(workdir, start_checkpoint, single_machine):
    """zero.py's ZeRO-3 across two machines through `accelerate launch` (without ACCELERATE_USE_CPU, which would pick
    CPU DDP over DeepSpeed; --use_cpu makes DeepSpeed use its CPU accelerator and gloo). DeepSpeed's own launcher
    with the hostfile (README "Several machines") starts slower, so the suite checks its hostfile's parsing and the
    SLURM script's deepspeed command only."""
    out = workdir / "output/multinode/zero3"
    args = [*COMMON, *PER_MACHINE, "--model", start_checkpoint, "--use_cpu", "--output_dir", str(out)]
    args += ["--deepspeed", str(ROOT / "deepspeed_config.json")]
    port = free_port()
    run_machines([accelerate_machine(rank, port, "trainer/sharded/zero.py", *args) for rank in (0, 1)], workdir, "zero3")
    metrics = read_metrics(out)
    assert metrics["num_devices"] == 2 and metrics["distributed_type"] == "DEEPSPEED"  # the ZeRO-3 engine really ran
    # As on one machine with 2 processes (tests/test_sharded.py): the partitioned reductions add in another
    # order (measured ~1e-7 relative here); 1e-3 leaves room for other BLAS builds.
    assert train_losses(metrics) == pytest.approx(train_losses(single_machine), rel=1e-3)
    assert metrics["eval_loss"] == pytest.approx(single_machine["eval_loss"], rel=1e-5)  # both shares gathered
    assert (out / "model.safetensors").is_file()  # the shards of both machines gathered into one file


def test_killed_machine_stops_the_other_and_the_run_resumes_from_the_last_checkpoint(workdir, start_checkpoint, two_machine_ddp):
    out = workdir / "output/multinode/killed"
    args = [*DDP_ARGS, "--model", start_checkpoint, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "20"]
    port = free_port()
    logs = [workdir / f"killed-machine{rank}.log" for rank in (0, 1)]
    machines = [
        start(accelerate_machine(rank, port, "trainer/getting_started.py", *args), workdir, log, ACCELERATE_USE_CPU="true")
        for rank, log in zip((0, 1), logs)
    ]
    try:
        # Kill machine 1 once the first checkpoint is complete: the trainer state (rank 0) and rank 1's RNG state.
        first = out / "checkpoint-20"
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not ((first / "trainer_state.json").is_file() and (first / "rng_state_1.pth").is_file()):
            assert all(m.poll() is None for m in machines) and time.monotonic() < deadline, log_tail(logs[0])
            time.sleep(0.05)
        kill_machine(machines[1])
        killed_at = time.monotonic()
        try:
            code = machines[0].wait(timeout=SURVIVOR_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"machine 0 still runs {SURVIVOR_TIMEOUT} s after machine 1 died:\n{log_tail(logs[0])}")
        waited = time.monotonic() - killed_at
    finally:
        for m in machines:
            if m.poll() is None:
                kill_machine(m)
    survivor = logs[0].read_text()
    print(f"machine 0 exited {code} {waited:.1f} s after machine 1 was killed")
    # It stopped with an error naming the lost connection, and its launcher reports the failure.
    assert code != 0 and not (out / "metrics.json").exists()  # killed mid-run, not after the end
    assert re.search(r"Connection (reset|closed) by peer|Broken pipe", survivor), survivor[-4000:]
    assert "ChildFailedError" in survivor

    # Relaunch both machines with the same command plus --resume_from_checkpoint latest.
    saved = sorted(int(p.name.removeprefix("checkpoint-")) for p in out.glob("checkpoint-*"))
    last = out / f"checkpoint-{saved[-1]}"
    assert 20 <= saved[-1] < STEPS
    state = json.loads((last / "trainer_state.json").read_text())
    port = free_port()
    resume = [*args, "--resume_from_checkpoint", "latest"]
    cmds = [accelerate_machine(rank, port, "trainer/getting_started.py", *resume) for rank in (0, 1)]
    run_machines(cmds, workdir, "resumed", ACCELERATE_USE_CPU="true")
    resumed = read_metrics(out)
    assert resumed["steps"] == STEPS
    # metrics.json reports the whole run: the checkpoint's part from its log history and this launch's steps after it
    # (a restart from step 0 would count the first part twice).
    assert resumed["resumed_from_step"] == state["global_step"]
    assert resumed["train_tokens"] == two_machine_ddp["train_tokens"]
    # And it went on exactly where the checkpoint stopped: the losses after it are the uninterrupted run's.
    after = {s: loss for s, loss in train_losses(resumed).items() if s > state["global_step"]}
    assert after and after == pytest.approx({s: train_losses(two_machine_ddp)[s] for s in after}, rel=1e-4)
    shutil.rmtree(out)  # the folder is of no further use


# ---------------------------------------------------------------- data on several machines


def test_two_machines_preparing_one_shared_folder_at_once_keep_one_complete_copy(tmp_path, monkeypatch):
    """Each machine's main process prepares the default data on first use (main_process_first is per machine), so
    on a shared disk two of them can finish at the same moment. The second rename must keep the first copy."""
    from hftrain import data

    out = tmp_path / "synthetic"
    rename = os.replace

    def other_machine_renames_first(src: str, dst: str) -> None:
        monkeypatch.setattr(os, "replace", rename)
        data.prepare(
            data.PrepareArguments(output_dir=str(out), num_examples=300)
        )  # the other machine, same arguments, done first
        rename(src, dst)  # a directory cannot replace a non-empty one: OSError

    monkeypatch.setattr(os, "replace", other_machine_renames_first)
    assert data.prepare(data.PrepareArguments(output_dir=str(out), num_examples=300)) == out
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # no temporary copy left behind
    prepared = data.load_prepared(str(out))
    assert len(prepared.train) + len(prepared.test) == 300


# ---------------------------------------------------------------- configs and launch files


CONFIGS = ["accelerate_config.yaml", *(f"accelerate_config_fsdp{kind}.yaml" for kind in ("", "_lora", "_qlora"))]


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_configs_take_the_multi_machine_flags(name):
    """What `accelerate launch` hands torchrun for machine 1 of 2 with 16 processes in all. The FSDP configs cannot
    shard on CPU, so this is as far as CI can check them on several machines."""
    import torch.distributed.run as torchrun
    from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    flags = ["--num_machines", "2", "--machine_rank", "1", "--num_processes", "16"]
    flags += ["--main_process_ip", "10.0.0.1", "--main_process_port", "29555"]
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / name), *flags, "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    run_args = _filter_args(args, torchrun.get_args_parser(), ["--training_script", "train.py", "--training_script_args", []])
    config, _, _ = torchrun.config_from_args(run_args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)  # --num_processes counts all machines
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == "10.0.0.1:29555"
    assert config.rdzv_configs["rank"] == 1  # static rendezvous: the machine rank is the one given
    assert env.get("ACCELERATE_USE_FSDP") == ("true" if "fsdp" in name else None)


def test_hostfile_lists_two_machines():
    from deepspeed.launcher.runner import fetch_hostfile

    assert fetch_hostfile(str(ROOT / "hostfile")) == {"node1": 8, "node2": 8}


FAKE_SRUN = """#!/bin/bash
while [[ $1 == -* ]]; do shift; done  # srun's options
status=0
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case $1 in
    show) printf 'gpu-a\\ngpu-b\\n' ;;
    requeue) echo "requeue $2" >> "$FAKE_LOG" ;;
esac
"""
FAKE_LAUNCHER = """#!/bin/bash
echo "node $SLURM_NODEID: $(basename "$0") $*" >> "$FAKE_LOG"
if [[ $(basename "$0") == deepspeed ]]; then sed "s/^/node $SLURM_NODEID: hostfile /" "$2" >> "$FAKE_LOG"; fi
exit "${FAKE_STATUS:-0}"
"""


def sbatch(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """slurm/train.sbatch run as SLURM would run it on the first of 2 nodes, with srun, scontrol and the launchers
    replaced by scripts that record what each node would have run (SLURM itself cannot run here)."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)] + [
            (launcher, FAKE_LAUNCHER) for launcher in ("accelerate", "torchrun", "deepspeed")
        ]:
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_ON_NODE": "8"}
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), **env}
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm/train.sbatch"), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    return proc, sorted(log.read_text().splitlines()) if log.exists() else []


def test_slurm_script_starts_one_launcher_per_node_and_resumes_after_a_failure(tmp_path):
    out = tmp_path / "run"
    proc, calls = sbatch(tmp_path, "scripts/trainer/getting_started.py", "--model", "small", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    flags = "--num_machines 2 --machine_rank {} --num_processes 16 --main_process_ip gpu-a --main_process_port 24242"
    expected = f"accelerate launch --config_file accelerate_config.yaml {flags} scripts/trainer/getting_started.py --model small"
    assert calls == [f"node {rank}: {expected.format(rank)} --output_dir {out}" for rank in (0, 1)]

    # A failure after a checkpoint: the job requeues itself, and the next attempt resumes from the latest checkpoint.
    (out / "checkpoint-20").mkdir(parents=True)
    proc, calls = sbatch(tmp_path, "scripts/trainer/getting_started.py", "--output_dir", str(out), FAKE_STATUS="1")
    assert proc.returncode == 1 and "requeue 4242" in calls
    assert all(c.endswith(f"--output_dir {out} --resume_from_checkpoint latest") for c in calls if c.startswith("node"))
    proc, calls = sbatch(
        tmp_path, "scripts/trainer/getting_started.py", "--output_dir", str(out), FAKE_STATUS="1", SLURM_RESTART_COUNT="3"
    )
    assert proc.returncode == 1 and "requeue 4242" not in calls  # MAX_REQUEUES (3) attempts used up

    # The other launchers; no --output_dir is refused before anything starts.
    _, calls = sbatch(tmp_path, "scripts/trainer/sharded/zero.py", f"--output_dir={out}", LAUNCHER="torchrun")
    assert "node 1: torchrun --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr gpu-a --master_port 24242" in calls[1]
    proc, calls = sbatch(tmp_path, "scripts/trainer/sharded/zero.py", f"--output_dir={out}", LAUNCHER="deepspeed")
    assert "node 1: hostfile gpu-a slots=8" in calls and "node 1: hostfile gpu-b slots=8" in calls, proc.stderr
    assert any(c.startswith("node 1: deepspeed --hostfile") and "--no_ssh --node_rank 1 --master_addr gpu-a" in c for c in calls)
    proc, calls = sbatch(tmp_path, "scripts/trainer/getting_started.py")
    assert proc.returncode == 2 and "pass --output_dir" in proc.stderr and calls == []
