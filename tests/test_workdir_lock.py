"""The workdir lock: one run per directory; stale locks of dead runs reclaimed, other hosts' refused."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from dapo_jax import workdir_lock
from dapo_jax.workdir_lock import Lock, WorkdirInUse

# A run in a child process: loads the lock module alone (no jax, so it starts in milliseconds), takes
# the lock when it reads a line, says whether it got it, and holds it until its stdin closes.
RUN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("workdir_lock", sys.argv[1])
workdir_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workdir_lock)
sys.stdin.readline()
try:
    lock = workdir_lock.Lock(sys.argv[2], "workdir")
    lock.acquire()
except workdir_lock.WorkdirInUse:
    print("refused", flush=True)
    sys.exit()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


@pytest.fixture(scope="module")
def run_py(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "run.py"
    path.write_text(RUN)
    return path


def start_runs(run_py, directory, n=1):
    """n child runs started at once into `directory`: (processes, what each said)."""
    runs = [subprocess.Popen([sys.executable, str(run_py), workdir_lock.__file__, str(directory)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for run in runs:
        run.stdin.write("go\n")
        run.stdin.flush()
    return runs, [run.stdout.readline().strip() for run in runs]


def end(run):
    run.stdin.close()
    assert run.wait(timeout=30) == 0


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def write_lock(directory, **fields):
    record = dict(host=socket.gethostname(), pid=dead_pid(), proc_start=None, started="2026-11-30T13:00:00+00:00",
                  command="python -m dapo_jax.train --workdir runs/x")
    (directory / ".lock").write_text(json.dumps({**record, **fields}))


def test_a_live_run_holding_the_lock_is_refused_by_pid_and_host(run_py, tmp_path):
    (holder,), said = start_runs(run_py, tmp_path)
    assert said == ["locked"]
    try:
        with pytest.raises(WorkdirInUse, match=f"workdir {tmp_path} is in use by pid {holder.pid} on host "
                                               f"{socket.gethostname()} since .* \\(.*run.py .*\\); "
                                               "wait for it to finish or use another --workdir$"):
            Lock(tmp_path, "workdir").acquire()
    finally:
        end(holder)


def test_the_lock_of_a_killed_run_is_reclaimed_naming_the_dead_pid(run_py, tmp_path, caplog):
    (holder,), _ = start_runs(run_py, tmp_path)
    holder.kill()
    holder.wait()
    assert (tmp_path / ".lock").exists()  # kill -9 leaves it behind
    with caplog.at_level(logging.WARNING), Lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"reclaiming the stale lock of pid {holder.pid} on host {socket.gethostname()}" in caplog.text
    assert "which is no longer running" in caplog.text


def test_a_reused_pid_does_not_keep_a_stale_lock_alive(tmp_path, caplog):
    write_lock(tmp_path, pid=os.getpid(), proc_start=-1)  # our pid, but a process started at another time
    with caplog.at_level(logging.WARNING), Lock(tmp_path):
        pass
    assert f"reclaiming the stale lock of pid {os.getpid()}" in caplog.text


def test_of_several_runs_reclaiming_one_stale_lock_only_one_wins(run_py, tmp_path):
    write_lock(tmp_path)
    runs, said = start_runs(run_py, tmp_path, n=4)
    for run in runs:
        end(run)
    assert sorted(said) == ["locked", "refused", "refused", "refused"]


def test_a_lock_from_another_host_is_refused_naming_the_file_to_delete(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1234)
    with pytest.raises(WorkdirInUse, match=f"pid 1234 on host elsewhere .* delete {tmp_path / '.lock'} and start "):
        Lock(tmp_path).acquire()
    assert (tmp_path / ".lock").exists()


def test_a_checkpoint_dir_lock_names_checkpoint_dir_in_its_advice(tmp_path):
    with Lock(tmp_path, "checkpoint.dir"):
        with pytest.raises(WorkdirInUse, match=f"checkpoint.dir {tmp_path} is in use .*use another checkpoint.dir$"):
            Lock(tmp_path, "checkpoint.dir").acquire()


def test_release_removes_the_lock_file(tmp_path):
    lock = Lock(tmp_path / "run")
    lock.acquire()
    assert (tmp_path / "run" / ".lock").exists()
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_run_ending_normally_removes_its_lock(run_py, tmp_path):
    (holder,), _ = start_runs(run_py, tmp_path)
    end(holder)
    assert not (tmp_path / ".lock").exists()


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(KeyError), Lock(tmp_path):
        raise KeyError
    assert not (tmp_path / ".lock").exists()


def test_release_leaves_a_lock_that_is_no_longer_this_runs(tmp_path):
    lock = Lock(tmp_path)
    lock.acquire()
    write_lock(tmp_path, host="elsewhere")  # someone deleted ours and another run took the directory
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "elsewhere"


def test_locks_on_different_directories_do_not_interfere(tmp_path):
    with Lock(tmp_path / "a"), Lock(tmp_path / "b"):
        assert (tmp_path / "a" / ".lock").exists() and (tmp_path / "b" / ".lock").exists()


def test_a_lock_file_holding_no_record_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock.time, "sleep", lambda _: None)
    (tmp_path / ".lock").write_text("")
    with pytest.raises(WorkdirInUse, match=f"holds no run's record: {tmp_path / '.lock'}; if no run"):
        Lock(tmp_path).acquire()


def test_a_uri_is_locked_through_fsspec():
    import fsspec

    memory, uri = fsspec.filesystem("memory"), "memory://runs/x/checkpoints"
    with Lock(uri, "checkpoint.dir"):
        assert json.loads(memory.cat_file("/runs/x/checkpoints/.lock"))["pid"] == os.getpid()
        with pytest.raises(WorkdirInUse, match=f"checkpoint.dir {uri} is in use by pid {os.getpid()}"):
            Lock(uri, "checkpoint.dir").acquire()
    assert not memory.exists("/runs/x/checkpoints/.lock")


def test_an_epath_directory_is_accepted(tmp_path):
    from etils import epath

    with Lock(epath.Path(tmp_path)):
        assert (tmp_path / ".lock").exists()


def test_the_module_loads_without_jax():
    probe = RUN.split("sys.stdin.readline()")[0] + "print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe, workdir_lock.__file__], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
