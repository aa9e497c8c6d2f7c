"""Checkpoints and run locks on a gs:// bucket, through a Cloud Storage API server on 127.0.0.1 (the
`gcs` fixture): what a run on a pod does with `checkpoint.dir=gs://...`. The training runs that
checkpoint to a bucket are in test_train_loop (stop and resume) and test_multihost (two processes
saving together, one of them preempted)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dapo_jax import checkpoints, config as config_lib, train, workdir_lock

ROOT = Path(__file__).resolve().parents[1]

# Saves step 1 in full, then kills itself (SIGKILL: nothing runs after it) as soon as some of
# step 2 is on the bucket and before step 2 is complete.
SAVE_THEN_DIE = textwrap.dedent("""
    import os, signal, sys, time
    import gcsfs, jax.numpy as jnp
    from dapo_jax import checkpoints

    where = sys.argv[1]
    big = jnp.arange(8 << 20, dtype=jnp.float32)  # 32 MiB a step: the emulator takes seconds to store it
    saver = checkpoints.Checkpointer(where, keep=3)
    saver.save(1, {"w": big, "b": jnp.ones(3)}, {"step": 1})
    saver.manager.wait_until_finished()
    fs = gcsfs.GCSFileSystem(token="anon")
    prefix = where.removeprefix("gs://") + "/"
    saver.save(2, {"w": big + 1, "b": jnp.zeros(3)}, {"step": 2})  # returns while the arrays are written
    deadline = time.time() + 120
    while time.time() < deadline:
        fs.invalidate_cache()
        step_2 = [p for p in fs.find(prefix) if p[len(prefix):].startswith("2")]
        if any("commit_success" in p.rsplit("/", 1)[-1] for p in step_2 if p[len(prefix):].startswith("2/")):
            sys.exit("step 2 was complete before it could be killed: make it larger")
        if step_2:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.005)
    sys.exit("step 2 never appeared on the bucket")
""")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_on_the_bucket(gcs):
    gcs.mkdir("killed")
    where = "gs://killed/run/checkpoints"
    died = subprocess.run([sys.executable, "-c", SAVE_THEN_DIE, where], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert died.returncode == -9, died.stdout[-2000:] + died.stderr[-4000:]
    gcs.invalidate_cache()
    assert any(p.startswith("killed/run/checkpoints/2") for p in gcs.find("killed/run/checkpoints"))  # half there

    saver = checkpoints.Checkpointer(where, keep=3)
    assert saver.latest_step() == 1
    like = {"w": jnp.zeros(8 << 20, jnp.float32), "b": jnp.zeros(3)}
    state, host = saver.restore(1, like)
    np.testing.assert_array_equal(state["w"], np.arange(8 << 20, dtype=np.float32))
    np.testing.assert_array_equal(state["b"], np.ones(3))
    assert host == {"step": 1}
    # the rerun's save of step 2 replaces the half-written one
    saver.save(2, {"w": like["w"] + 5, "b": like["b"]}, {"step": 2})
    saver.close()
    again = checkpoints.Checkpointer(where, keep=3)
    assert again.latest_step() == 2
    state, host = again.restore(2, like)
    assert float(state["w"][0]) == 5.0 and host == {"step": 2}
    again.close()


def test_a_bucket_path_is_locked_for_one_run(gcs):
    gcs.mkdir("locked")
    with workdir_lock.Lock("gs://locked/run", "checkpoint.dir"):
        assert gcs.find("locked") == ["locked/run/.lock"]
        with pytest.raises(workdir_lock.WorkdirInUse, match=r"checkpoint.dir gs://locked/run is in use by pid \d+"):
            workdir_lock.Lock("gs://locked/run", "checkpoint.dir").acquire()
    gcs.invalidate_cache()
    assert gcs.find("locked") == []


def test_a_workdir_on_a_bucket_is_refused_before_the_run(tmp_path):
    c = config_lib.default_config()
    want = r"--workdir gs://b/run must be a local directory.*--config.checkpoint.dir=gs://b/run"
    with pytest.raises(config_lib.ConfigError, match=want):
        train.train(c, "gs://b/run")
    assert not Path("gs:").exists()


def test_orbax_arrays_on_the_bucket_keep_their_shardings(gcs):
    """A sharded array saved from the 8-device mesh comes back with the sharding asked for."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    gcs.mkdir("sharded")
    mesh = jax.make_mesh((8,), ("fsdp",))
    x = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(mesh, P("fsdp")))
    saver = checkpoints.Checkpointer("gs://sharded/ck", keep=1)
    saver.save(3, {"x": x}, {})
    saver.close()
    like = {"x": jax.device_put(jnp.zeros((16, 4)), NamedSharding(mesh, P()))}
    state, _ = checkpoints.Checkpointer("gs://sharded/ck", keep=1).restore(3, like)
    assert state["x"].sharding == like["x"].sharding
    np.testing.assert_array_equal(state["x"], np.arange(64.0).reshape(16, 4))
