"""Stop requests: the signals that ask a run to stop, and how every rank agrees to stop together.

SIGTERM (kill, torchrun's shutdown, SLURM's scancel and preemption), SIGUSR1 (SLURM's `--signal` warning
before the time limit), SIGINT (Ctrl-C) and SIGHUP (the terminal closed; torchrun forwards it) only set a
flag (a process started with SIGHUP ignored, by `nohup`, keeps ignoring it); the trainer reads it once per
step, finishes that step, saves a checkpoint and exits 0. A worker started by torchrun also asks the kernel
for SIGTERM when the launcher dies (`stop_with_the_launcher`, PR_SET_PDEATHSIG): torchrun does not handle
SIGUSR1 unless told to and dies of it, and a launcher killed with kill -9 forwards nothing, so without this
its workers would train on as orphans.

Who receives what: torchrun starts every worker in its own session, so a signal to the launcher's
process group reaches the launcher only; it forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT (its
`--signals-to-handle`) to each worker's group, waits `--shutdown-timeout` seconds (default 30, or
TORCH_ELASTIC_SHUTDOWN_TIMEOUT), then sends SIGKILL, and exits 1. A step plus a save must fit in that
timeout. SLURM signals every process of the job step directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1


def stop_with_the_launcher() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID is its) on Linux, have the kernel send this process SIGTERM
    when the launcher dies; elsewhere the parent is a shell or a scheduler daemon whose exit is no
    reason to stop. Call it first thing (before slow imports): the request only covers a launcher
    that is still alive when it is made."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher:  # it died during the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


class StopSignal:
    """While active (a context manager), remembers that a stop signal arrived; the trainer checks once
    per step. Previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous = {}

    @classmethod
    def handled(cls) -> list[signal.Signals]:
        """The stop signals to install a handler for: all but a SIGHUP this process was started ignoring
        (`nohup`: the run is meant to outlive its terminal)."""
        return [sig for sig in cls.SIGNALS if not (sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN)]

    def __enter__(self) -> "StopSignal":
        for sig in self.handled():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def agreed(self, device) -> bool:
        """True on every rank as soon as any rank got a signal (ranks must save together). Collective."""
        import torch  # here: stop_with_the_launcher runs before torch is imported
        import torch.distributed as dist

        flag = torch.tensor([float(self.received is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def stop_signals_blocked():
    """Meanwhile this thread holds the stop signals back (a process-directed one goes to another thread,
    or waits until the block ends: none is lost). A process started from here inherits the block, so it
    cannot die of one before it has said what to do with them."""
    import multiprocessing.resource_tracker

    # multiprocessing starts its resource tracker with the first process it starts, and that start unblocks
    # SIGINT and SIGTERM in the calling thread: start it before the block.
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopSignal.SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_stopping_to_the_trainer(worker_id: int) -> None:
    """A data-loader worker's `worker_init_fn`: stop signals from anyone but its trainer are dropped.

    The workers are in their training process's group, so a signal to the group (torchrun's forwarding,
    Ctrl-C, SLURM's signal to every process) reaches them too; one that died of it made torch raise in the
    trainer mid-step, with nothing saved. The trainer's own SIGTERM still ends a worker: multiprocessing
    sends it to the workers of a process that exits with them running (after an error nothing caught) and
    then waits for them, forever if they ignored it. The workers start with the signals blocked
    (`stop_signals_blocked`, inherited by every thread they start), so each one, whenever it came, waits
    for a thread here that reads who sent it."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no way to tell the sender; ignore them all
        for sig in StopSignal.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, StopSignal.SIGNALS)

    def sort_out() -> None:
        while True:
            received = signal.sigwaitinfo(StopSignal.SIGNALS)
            if received.si_pid == trainer:
                os._exit(128 + received.si_signo)

    threading.Thread(target=sort_out, name="stop-signals", daemon=True).start()
