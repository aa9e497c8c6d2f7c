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

import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


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
    def __init__(self, directory: str | Path, keep: int):
        self.directory = as_path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, host: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        host=ocp.args.JsonSave(host)))

    def restore(self, step: int, like_state):
        """(state, host) of checkpoint `step`; arrays take the shardings of `like_state`'s."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like_state)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 host=ocp.args.JsonRestore()))
        return out.state, out.host

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class StopRequest:
    """Set by SIGTERM (and SIGINT while installed); every host agrees before the loop acts on it,
    so no host takes a branch the others do not."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))
