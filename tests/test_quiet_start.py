"""A process on a machine without a TPU starts clean even with libtpu installed (the dev extra): jax is
not sent to initialise libtpu there, whose five lines of errors would otherwise open every run, test
and error message. Each test is a fresh process without JAX_PLATFORMS, as a newcomer would start one."""

import importlib.util
import os
import subprocess
import sys

import pytest
from jax._src import hardware_utils

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed, so jax has no TPU backend to initialise"),
    pytest.mark.skipif(hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0,
                       reason="a TPU is attached: jax should initialise libtpu here"),
]

# What libtpu prints when it starts on a machine without TPU chips.
LIBTPU_NOISE = ("INVALID_ARGUMENT", "InitGoogle", "TPU_WORKER_HOSTNAMES", "TPU accelerator type", "libtpu")


def run_fresh(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def assert_no_libtpu_noise(stderr: str):
    noise = [line for line in stderr.splitlines() if any(marker in line for marker in LIBTPU_NOISE)]
    assert not noise, "libtpu initialised on a machine without a TPU:\n" + "\n".join(noise)


def test_the_first_device_query_prints_nothing():
    done = run_fresh("-c", "import dapo_jax, jax; print(jax.devices())")
    assert done.returncode == 0, done.stderr
    assert "CpuDevice" in done.stdout
    assert_no_libtpu_noise(done.stderr)


def test_an_entry_point_error_is_the_first_thing_printed(tmp_path):
    # The forced 8 CPU devices (conftest's XLA_FLAGS, inherited) cannot form an fsdp axis of 3.
    done = run_fresh("-m", "dapo_jax.train", "--workdir", str(tmp_path / "run"), "--config.mesh.fsdp=3")
    assert done.returncode != 0 and "ConfigError" in done.stderr
    assert_no_libtpu_noise(done.stderr)
