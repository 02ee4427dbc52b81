"""Launching processes: free rendezvous ports, one-GPU environments, a failed worker's error in one line,
and the check that every launched process joins the run."""

import os
import re
import socket
from collections.abc import Mapping

import torch

from hftrain.errors import UserError


def free_port() -> int:
    """A TCP port nothing listens on now, for a rendezvous: runs side by side (or a lingering process) never share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_gpu_only(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a one-GPU case, seeing only the first visible GPU: a plain process that saw several would
    have the Trainer wrap the model in DataParallel over all of them."""
    return {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}


def worker_error(stderr: str, returncode: int) -> str:
    """A failed launch in one line, for a results table: the worker's own exception, not the launcher's
    ChildFailedError summary that follows it (without one, the last lines; without output, the exit status)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not set(ln.strip()) <= set("=-^~")]
    errors = [ln for ln in lines if re.search(r"\w(Error|Exception)\b", ln) and "ChildFailedError" not in ln]
    return (errors[-1] if errors else " / ".join(lines[-3:]))[-600:] or f"exit status {returncode}"


def check_launch(num_processes: int, device: torch.device) -> None:
    """The processes a launcher started must all join one run: refuse more per machine than it has GPUs, and a
    multi-GPU launch on a machine without any (where each process would silently train alone)."""
    started = int(os.environ.get("WORLD_SIZE", "1"))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))  # torchrun; deepspeed
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0  # CPU processes (ACCELERATE_USE_CPU) need none
    if gpus and per_machine > gpus:  # accelerate would put two processes on one GPU, which NCCL refuses mid-run
        raise UserError(
            f"{per_machine} processes were launched on this machine but it has {gpus} GPU(s); "
            f"launch with --num_processes {gpus} (or set num_processes: {gpus} in the accelerate config)"
        )
    if started > num_processes:
        raise UserError(
            f"{started} processes were launched but only {num_processes} joined the run, as with a multi-GPU config on a "
            f"machine without GPUs; run one process with plain python, or {started} CPU processes with "
            f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {started}"
        )
