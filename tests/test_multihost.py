"""Multi-host: two processes on localhost joined by jax.distributed (4 CPU devices each) train the tiny
config on the 8-device global mesh and end with the losses and parameters of one process with 8
devices. Every process runs the same host loop; checkpoints are written cooperatively to a bucket, and
a SIGTERM to one process stops both at the same step."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
from conftest import free_port

from dapo_jax import config as config_lib, evaluate
from dapo_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--config=configs/synthetic_tiny.py", "--config.steps=3", "--config.rollout.prompts_per_step=4",
         "--config.rollout.samples_per_prompt=4", "--config.rollout.gen_prompts_per_batch=8",
         "--config.rollout.on_gen_batch_limit=train_partial", "--config.optim.minibatch_size=8",
         "--config.data.synthetic.train_problems=200", "--config.data.eval_problems=8",
         "--config.eval.samples_per_prompt=2", "--config.eval.every=2", "--config.checkpoint.every=1",
         "--config.tensorboard=false"]


def start(workdir, devices, extra=()):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "dapo_jax.train", *FLAGS, f"--workdir={workdir}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=900):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def params(workdir):
    """The float32 parameters of the run's last checkpoint (the Hugging Face export is bfloat16)."""
    cfg = config_lib.default_config()
    return jax.tree_util.tree_leaves(evaluate.load_policy(cfg, workdir, mesh=None)[1])


LOSSES = ("actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/approx_kl", "rollout/acc_mean",
          "rollout/response_length_mean", "dynamic_sampling/gen_batches")


def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path, gcs):
    """The pair checkpoints to a gs:// bucket (the `gcs` emulator), as hosts of a pod do, and one of
    them is preempted (SIGTERM to it alone) once step 1 is saved: both save and exit at the same
    step, and the rerun of both resumes from the bucket."""
    gcs.mkdir("multi")
    bucket = "gs://multi/two"

    def saved_steps():
        gcs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[-1] for p in gcs.ls("multi/two") if p.rsplit("/", 1)[-1].isdigit())

    port = free_port()

    def pair():
        return [start(tmp_path / "two", 4, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                            f"--process_id={i}", f"--config.checkpoint.dir={bucket}"])
                for i in range(2)]

    first = pair()
    deadline = time.time() + 600
    while not gcs.exists("multi/two/1/commit_success.txt"):  # orbax's mark of a finished save on a bucket
        gcs.invalidate_cache()
        assert time.time() < deadline and all(p.poll() is None for p in first), "step 1 was never saved"
        time.sleep(0.2)
    signalled = time.perf_counter()
    first[1].send_signal(signal.SIGTERM)  # the preempted host
    stopped = [finish(p) for p in first]
    print(f"SIGTERM to process 1 -> both exited: {time.perf_counter() - signalled:.1f} s")
    (at,) = re.findall(r"stopped by a signal after step (\d+); checkpoint saved", stopped[0])
    assert saved_steps() == [str(int(at) - 1), at]  # keep=2
    port = free_port()
    outputs = [finish(p) for p in pair()]
    assert f"resumed from {bucket} at step {at}" in outputs[0]
    finish(start(tmp_path / "one", 8))

    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3, 3]
    # approx_kl is a mean of differences of O(1) log-probs, so its float32 rounding is absolute: ~1e-7
    # per token whatever its value (seen: 1.5e-7 apart at approx_kl = -5e-4, with identical rollouts).
    atol = {"actor/approx_kl": 1e-6}
    # grad_norm sums the squares of every gradient entry, reduced in another order over two processes:
    # seen 1.7e-5 apart (relative) at step 3 with the same rollouts.
    rtol = {"actor/grad_norm": 5e-5}
    for a, b in zip(two, one):
        for key in LOSSES + ("eval/all/avg@2",):
            if key in b:
                np.testing.assert_allclose(a[key], b[key], rtol=rtol.get(key, 1e-5), atol=atol.get(key, 1e-7),
                                           err_msg=f"step {b['step']} {key}")
    # The gradients are summed across processes by gloo instead of in one process, so float32 sums can
    # differ in their last bits; Adam divides each update by its gradient's own scale, so for a
    # near-zero gradient that can shift a parameter by a small part of one step (lr 2e-4). Bound:
    # a tenth of one step for any parameter, and 1e-6 on average.
    for a, b in zip(params(tmp_path / "two"), params(tmp_path / "one")):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
        assert np.mean(np.abs(np.asarray(a) - np.asarray(b))) < 1e-6
    # one set of outputs: process 0 logs and writes; both wrote the checkpoint together
    assert "held-out evaluation before training" in stopped[0] and "held-out evaluation" not in stopped[1] + outputs[1]
    assert saved_steps() == ["2", "3"] and not (tmp_path / "two" / "checkpoints").exists()
    assert json.loads((tmp_path / "two" / "config.json").read_text())["steps"] == 3


ROUTED = textwrap.dedent("""
    import os, signal, socket, threading, time
    from dapo_jax import checkpoints

    def tasks():
        return set(os.listdir("/proc/self/task"))

    before = tasks()
    checkpoints.receive_stop_signals()
    import jax  # jax.distributed starts threads, and installs a SIGTERM handler of its own
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=1, process_id=0)
    checkpoints.receive_stop_signals()
    jax.numpy.ones(8).sum().block_until_ready()
    bits = sum(1 << (s - 1) for s in checkpoints.STOP_SIGNALS)
    waiter = {str(t.native_id) for t in threading.enumerate() if t.name == "stop-signals"}  # (in sigwait: unblocked)
    masks = {t: open(f"/proc/self/task/{t}/status").read().split("SigBlk:")[1].split()[0]
             for t in tasks() - before - waiter}
    print("threads started later:", len(masks) > 2, "all blocking:", all(int(m, 16) & bits == bits for m in masks.values()))

    def wait_for(condition, seconds=10):
        deadline = time.time() + seconds
        while not condition() and time.time() < deadline:
            time.sleep(0.01)
        return condition()

    seen = 0
    for _ in range(10):
        with checkpoints.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            seen += wait_for(lambda: stop.requested)
    print("requests inside the loop:", seen)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: False, 5)
        print("SIGINT outside: nothing")
    except KeyboardInterrupt:
        print("SIGINT outside: KeyboardInterrupt")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
    with checkpoints.StopRequest() as stop:
        print("SIGTERM outside, kept for the next loop:", stop.requested)
""")


def test_the_train_command_takes_stop_signals_in_a_thread_of_their_own():
    """`checkpoints.receive_stop_signals` (the train command's first step): threads started after it
    (jax.distributed's, XLA's) never take the signals; inside the loop each is a stop request, even
    with jax.distributed's SIGTERM handler installed; outside, SIGINT is a KeyboardInterrupt and a
    SIGTERM waits for the loop."""
    done = subprocess.run([sys.executable, "-c", ROUTED], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.splitlines() == ["threads started later: True all blocking: True",
                                        "requests inside the loop: 10", "SIGINT outside: KeyboardInterrupt",
                                        "SIGTERM outside, kept for the next loop: True"]

def test_a_process_without_its_peers_says_what_is_missing(tmp_path):
    process = start(tmp_path, 4, ["--coordinator_address=127.0.0.1:1", "--num_processes=2"])
    out, _ = process.communicate(timeout=120)
    assert process.returncode != 0 and "--process_id in [0, num_processes)" in out
