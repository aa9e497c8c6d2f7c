"""Checkpoints with orbax: the train state (params, optimizer state, counters) as arrays in their
shardings, and the host state (data position, carried-over groups, running totals) as JSON, saved
together under one step so that a resumed run continues exactly where it stopped. The random state
needs no saving: every sampler seed is derived from (config seed, rollout step, generation batch).

    <workdir>/checkpoints/<step>/{state, host}       (or <checkpoint.dir>/<step>/..., e.g. a gs:// bucket)

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one. On SIGTERM (a preempted TPU VM) the loop
finishes its step, saves, and exits cleanly.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def as_path(directory: str | Path):
    """A local Path, or for a URI (gs://bucket/dir) the etils path orbax writes through; a bucket
    needs etils' GCS backend (gcsfs), which the `tpu` extra installs."""
    if "://" in str(directory):
        from etils import epath

        return epath.Path(str(directory))
    return Path(directory).absolute()


def checkpoint_dir(cfg, workdir: str | Path):
    """Where a run's checkpoints go: checkpoint.dir, or <workdir>/checkpoints. On a multi-host run
    every host writes its own shards there, so it must be storage they share (a bucket)."""
    return as_path(cfg.checkpoint.dir or Path(workdir) / "checkpoints")


class Checkpointer:
    """Saves run in the background; a save's error (this host's, or a save not finished within
    `timeout_s`, e.g. another host's that failed) is raised by the next save or by close()."""

    def __init__(self, directory: str | Path, keep: int, timeout_s: int = 1200):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               async_options=ocp.AsyncOptions(timeout_secs=timeout_s))
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, host: dict) -> None:
        with self._failures():  # this save's, or the previous one's surfacing now
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            host=ocp.args.JsonSave(host)))

    def restore(self, step: int, like_state):
        """(state, host) of checkpoint `step`; arrays take the shardings of `like_state`'s."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 host=ocp.args.JsonRestore()))
        return out.state, out.host

    def close(self) -> None:
        with self._failures():
            self.manager.wait_until_finished()
        self.manager.close()

    @contextlib.contextmanager
    def _failures(self):
        """Any error inside as a SaveFailed that says which checkpoint a rerun resumes from."""
        try:
            yield
        except Exception as error:
            try:
                latest = self.manager.latest_step()
                latest = ("no checkpoint is complete yet" if latest is None else
                          f"the latest complete checkpoint is step {latest}, and a rerun resumes from it")
            except Exception:  # the storage may be what failed
                latest = "the latest complete checkpoint could not be listed"
            raise SaveFailed(f"saving a checkpoint into {self.directory} failed ({type(error).__name__}: "
                             f"{str(error)[:500]}); {latest}") from error


def use_distributed_barriers() -> None:
    """Makes orbax wait for the other hosts through jax.distributed's coordinator rather than through
    a JAX program. Its default barrier (`multihost_utils.sync_global_devices`, a psum over every
    device) also runs from its background threads (finalizing a save, deleting old checkpoints),
    so each host may launch it between different programs of the main thread; a program that spans
    hosts waits until every host launches its counterpart, so the hosts then wait for each other
    for good. Seen: two processes each blocked in a different eager op of the engine's set-up, the
    step after a save, in 3 of 32 runs of the 2-process pair checkpointing to the bucket emulator.
    The coordinator's barrier runs no program, and has a timeout. Call it once absl has parsed the flags (the commands' main)."""
    from absl import flags

    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (on this host, or another host never finished its part)."""


@contextlib.contextmanager
def exit_on_failed_save():
    """Ends the process at once, with status 1, if a save fails inside. A normal exit would hang: the
    failed save's writer threads cannot be stopped (storage errors are retried for minutes) and the
    interpreter waits for them, and on a multi-host run the other hosts wait for this one at
    jax.distributed's shutdown. A checkpoint counts once complete (renamed into place, or on a bucket
    marked by its commit_success file), so the previous one stays the latest."""
    try:
        yield
    except SaveFailed as error:
        sys.stdout.flush()
        traceback.print_exception(error.__cause__ or error, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr, flush=True)
        os._exit(1)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_entered: list[StopRequest] = []  # the StopRequests in force, innermost last
_pending = False  # a SIGTERM that came while none was: the next StopRequest starts requested
_received_in_a_thread = False


def receive_stop_signals() -> None:
    """Keeps SIGTERM and SIGINT away from the threads that talk to other hosts. Call it first in the
    process, before jax.distributed or the backend start threads: the signals are blocked in the
    calling thread and so in every thread started after it (and in child processes, which inherit
    the mask), and a thread of their own takes them (sigwait). Delivered the usual way, a signal
    lands in the main thread and interrupts the system call it is in (EINTR), often a wait inside
    the runtime (a collective, the coordinator, a transfer), which not every library retries.
    Threads that predate the call (numpy's BLAS pool) still take the signals through the handler,
    which runs in the main thread between bytecodes. (First suspected for hangs of the 2-process
    test after a SIGTERM, which went on with this in place: see `use_distributed_barriers`.)

    Call it again after jax.distributed.initialize, whose preemption notifier installs a SIGTERM
    handler of its own: that handler takes the signal, and nothing acts on it, whenever it lands in
    a thread that does not block it (measured: 0 of 20 SIGTERMs reached the loop). A SIGTERM while
    no StopRequest is in force is kept for the next one (the run stops after its first step); SIGINT
    then raises KeyboardInterrupt in the main thread, once its blocking call returns."""
    global _received_in_a_thread
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    if not _received_in_a_thread:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        threading.Thread(target=_receive, name="stop-signals", daemon=True).start()
        _received_in_a_thread = True


def _receive() -> None:
    while True:
        sig = signal.sigwait(STOP_SIGNALS)
        try:
            if _take(sig):
                _thread.interrupt_main(sig)  # runs _on_signal in the main thread
        except Exception:  # noqa: BLE001 - this thread must outlive anything a delivery runs into
            log.exception("delivering %s", signal.Signals(sig).name)


def _on_signal(sig: int, frame) -> None:
    if _take(sig):
        raise KeyboardInterrupt


def _take(sig: int) -> bool:
    """Marks the innermost StopRequest in force, or keeps a SIGTERM for the next one. True for a
    SIGINT that found none: the caller raises KeyboardInterrupt in the main thread."""
    global _pending
    innermost = _entered[-1:]  # one read: __exit__ may remove it meanwhile
    if innermost:
        innermost[0].requested = True
    elif sig == signal.SIGTERM:
        _pending = True
    return not innermost and sig == signal.SIGINT


class StopRequest:
    """Set by SIGTERM (and SIGINT while entered); every host agrees before the loop acts on it, so
    no host takes a branch the others do not. Its handler is installed while entered (train() called
    in-process); with `receive_stop_signals` set up (the train command), that thread delivers here
    too and the handler stays."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        global _pending
        # installed again in the train command too: jax.distributed's notifier may have taken SIGTERM
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, _on_signal)
        self.requested, _pending = _pending, False
        _entered.append(self)
        return self

    def __exit__(self, *exc):
        _entered.remove(self)
        if not _received_in_a_thread:  # (the train command keeps them: see receive_stop_signals)
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))
