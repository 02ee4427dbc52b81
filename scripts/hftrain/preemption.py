"""Preemption: SIGTERM or Ctrl-C during training saves a checkpoint, then the run exits saying how to resume.

Schedulers announce preemption and time limits with SIGTERM (SLURM, Kubernetes, spot instances), and
`torchrun` / `accelerate launch` pass SIGTERM and Ctrl-C on to every training process, which they kill
30 s later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT). The handler only sets a flag. At the end of the current
optimizer step every process stops (they agree, so that all of them save the same step: the accelerate
loops through `accelerator.set_trigger()` / `check_trigger()`, the Trainer's callback through
`requested`), the checkpoint is written, and each process exits with status 128 + the signal number: 143
after SIGTERM, 130 after Ctrl-C, what a shell reports for a process the signal killed (143 for a process
that stops because another one got the signal). So
`train && evaluate` does not go on, and a job script tells "preempted: resume" (143, 130) from
"failed" (1) and "done" (0). The plain loops, which write no checkpoints, take `StopWithoutSaving`
instead: the signal stops them at once with status 1 and a sentence saying that nothing was saved.

A second Ctrl-C stops at once, as without the handler. A repeated SIGTERM is ignored: under a
scheduler the launcher and the training processes often each get one, and the launcher passes its
own on.
"""

import os
import signal
import sys
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import TrainerCallback

from hftrain.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Preemption:
    """Catches SIGTERM and SIGINT from its creation (in the main thread) until `restore()`."""

    def __init__(self) -> None:
        self.signum = 0  # the first signal this process received (after `requested`: any process received)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum
            # os.write, not print: a handler may run in the middle of another print
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint after this step{again}\n".encode())
        elif not signum == self.signum == signal.SIGTERM:
            self.restore()
            signal.raise_signal(signum)  # as without the handler: KeyboardInterrupt for SIGINT, termination for SIGTERM

    def requested(self, device: torch.device | str | None = None) -> bool:
        """Whether any process got a signal. Under torch.distributed an all-reduce (every process must call it at
        the same step, on its own device), so that they all stop after the same step."""
        if _distributed():
            flag = torch.tensor(self.signum, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag)
        return bool(self.signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def exit(self, step: int, checkpoint: str, is_main_process: bool) -> NoReturn:
        """Call on every process once the checkpoint is saved."""
        if _distributed():
            dist.barrier()  # every process's part of the checkpoint is written
        if is_main_process:  # tqdm.write: on a line of its own, below the progress bar
            tqdm.write(
                f"preempted at step {step}: checkpoint saved in {checkpoint}; "
                "resume with the same command and --resume_from_checkpoint latest"
            )
        if _distributed():
            dist.barrier()  # a launcher stops the other processes as soon as one exits with an error status
            dist.destroy_process_group()
        # A process stopped by another's signal (accelerate's trigger carries no signal number) reports SIGTERM's 143.
        sys.exit(128 + (self.signum or signal.SIGTERM))  # the handlers stay: a launcher's repeated SIGTERM is still ignored


class StopWithoutSaving:
    """For a loop that writes no checkpoints (the plain loops): SIGTERM or Ctrl-C stops it at once with status 1 and a
    sentence saying that nothing was saved, never with 143 or 130, which tell a job script "checkpoint saved: resume"."""

    def __init__(self) -> None:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.restore()
        raise UserError(
            f"stopped by {signal.Signals(signum).name}: nothing was saved (this loop writes no checkpoints; its "
            "_accelerate.py twin saves them and continues with --resume_from_checkpoint latest)"
        )

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class PreemptionCallback(TrainerCallback):
    """For the Trainer: on SIGTERM or Ctrl-C, save a checkpoint at the end of the step and exit (see above)."""

    def __init__(self) -> None:
        self.preemption: Preemption | None = None
        self.stopping = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.preemption = Preemption()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After the last step the run only evaluates and saves: it is let finish.
        if self.preemption is not None and state.global_step < state.max_steps and self.preemption.requested(args.device):
            self.stopping = True
            # Log the loss of the steps since the last row, so that none is lost; the checkpoint before any
            # evaluation, as a launcher kills the processes 30 s after passing the signal on.
            control.should_log = control.should_save = control.should_training_stop = True
            control.should_evaluate = False

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopping and self.preemption is not None:  # skips the final evaluation, save and metrics.json
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self.preemption.exit(state.global_step, checkpoint, args.process_index == 0)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.preemption is not None:  # Ctrl-C behaves as usual again (evaluation, saving)
            self.preemption.restore()
