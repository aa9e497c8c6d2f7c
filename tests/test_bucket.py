"""Checkpoints and run locks on a gs:// bucket, through a Cloud Storage API server on 127.0.0.1 (the
`gcs` fixture): what a run on a pod does with `checkpoint.dir=gs://...`. The training runs that
checkpoint to a bucket are in test_train_loop (stop and resume) and test_multihost (two processes
saving together, one of them preempted)."""

import os
import re
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


# One of two jax.distributed processes saves a checkpoint whose array writes all fail (its tensorstore
# is pointed at a path the server does not serve); the other's succeed and wait for it.
ONE_HOST_FAILS = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    process, port, where = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    from dapo_jax import checkpoints

    sharding = NamedSharding(jax.make_mesh((2,), ("d",)), P("d"))
    w = jax.make_array_from_callback((2, 1024), sharding, lambda index: np.ones((2, 1024), np.float32)[index])
    saver = checkpoints.Checkpointer(where, keep=2, timeout_s=int(sys.argv[4]))
    started = time.perf_counter()
    with checkpoints.exit_on_failed_save():
        try:
            saver.save(1, {"w": w}, {"step": 1})
            saver.close()
        finally:
            print(f"ended after {time.perf_counter() - started:.1f} s", flush=True)
    print("saved")
""")


def test_a_save_that_fails_on_one_host_stops_every_host(gcs):
    """Orbax does not carry one host's write error to the others: they wait in its barrier for
    checkpoint.timeout_s (orbax's default: 20 min), then raise. Both processes must end with an
    error, and no checkpoint may look complete."""
    from conftest import free_port

    gcs.mkdir("failing")
    where, port, timeout_s = "gs://failing/run", free_port(), 10
    url = os.environ["TENSORSTORE_GCS_HTTP_URL"]
    pair = []
    for process in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
        if process == 1:
            env["TENSORSTORE_GCS_HTTP_URL"] = url + "/not-served"
        pair.append(subprocess.Popen([sys.executable, "-c", ONE_HOST_FAILS, str(process), str(port), where,
                                      str(timeout_s)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=180)[0] for p in pair]
    except subprocess.TimeoutExpired:
        for p in pair:
            p.kill()
        raise AssertionError("\n".join(f"--- process {i}:\n{p.communicate()[0][-3000:]}" for i, p in enumerate(pair)))
    for p, out in zip(pair, outputs):
        assert p.returncode == 1 and f"error: saving a checkpoint into {where} failed" in out, out[-3000:]
        assert "no checkpoint is complete yet" in out
        assert float(re.search(r"ended after ([\d.]+) s", out).group(1)) < timeout_s + 30, out[-3000:]
    saver = checkpoints.Checkpointer(where, keep=2)
    assert saver.latest_step() is None
    saver.close()


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


def test_the_emulator_keeps_cloud_storage_preconditions(gcs):
    """What the run lock and tensorstore's manifest commits rely on (tests/gcs_emulator.py): create
    only if absent, write only over the generation read, a download's generation, 304 on reads whose
    ifGenerationNotMatch does not hold."""
    import json
    import urllib.error
    import urllib.request

    base, bucket = os.environ["STORAGE_EMULATOR_HOST"], "preconditions"
    gcs.mkdir(bucket)

    def call(method, path, data=None, **query):
        url = f"{base}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def upload(body, **query):
        return call("POST", f"/upload/storage/v1/b/{bucket}/o", body, uploadType="media", name="m", **query)

    status, _, body = upload(b"one", ifGenerationMatch=0)
    assert status == 200
    first = int(json.loads(body)["generation"])
    assert upload(b"two", ifGenerationMatch=0)[0] == 412  # exists
    status, headers, body = call("GET", f"/download/storage/v1/b/{bucket}/o/m", alt="media")
    assert (status, body, int(headers["x-goog-generation"])) == (200, b"one", first)
    assert call("GET", f"/storage/v1/b/{bucket}/o/m", alt="media", ifGenerationNotMatch=first)[0] == 304
    assert upload(b"two", ifGenerationMatch=first + 1)[0] == 412  # not the generation read
    status, _, body = upload(b"two", ifGenerationMatch=first)
    second = int(json.loads(body)["generation"])
    assert status == 200 and second != first
    assert call("GET", f"/storage/v1/b/{bucket}/o/m", ifGenerationMatch=first)[0] == 412
    assert call("DELETE", f"/storage/v1/b/{bucket}/o/m", ifGenerationMatch=first)[0] == 412
    assert call("DELETE", f"/storage/v1/b/{bucket}/o/m", ifGenerationMatch=second)[0] in (200, 204)
    assert call("GET", f"/storage/v1/b/{bucket}/o/m")[0] == 404
    assert call("GET", f"/storage/v1/b/{bucket}/o/m", alt="media", ifGenerationNotMatch=0)[0] == 404
