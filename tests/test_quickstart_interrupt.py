"""`medfusion quickstart` stopped by a real signal mid-training leaves the workspace as it was: the
paper protocol in params.yaml, no dvc.lock, a clean git status, HEAD on its branch, and no stage
process left running. (Today's trap: a SIGTERM left the quickstart's overrides in params.yaml, so
the next `dvc repro` silently ran the toy settings.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_repo

pytestmark = pytest.mark.slow

START_S = 300  # until the first train stage starts, on a busy 2-core machine
STOP_S = 120  # until the quickstart has stopped DVC and restored the workspace


def _git(repo: Path, env: dict, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True).stdout


def _processes_in(repo: Path) -> list[str]:
    """Command lines of processes whose working directory is inside `repo` (the stages run in
    repo/.dvc/tmp/exps/...)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd.startswith(str(repo)) and int(proc.name) != os.getpid():
            found.append(cmdline)
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_training_leaves_the_workspace_as_it_was(tmp_path, signum):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = copy_repo(repo)
    params_before = (repo / "params.yaml").read_bytes()
    head_before = _git(repo, env, "rev-parse", "HEAD"), _git(repo, env, "symbolic-ref", "HEAD")
    assert _git(repo, env, "status", "--porcelain") == ""

    log_path = tmp_path / "quickstart.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medfusion.cli", "quickstart", "--name", "qs-stopped"],
            cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_S
        while "Running stage 'train" not in log_path.read_text():
            assert proc.poll() is None, f"the quickstart ended early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no train stage within {START_S} s"
            time.sleep(0.5)
        time.sleep(3)  # well inside the stage: its process is training
        os.kill(proc.pid, signum)
        proc.wait(timeout=STOP_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert proc.returncode == 128 + signum, output[-3000:]
    assert "the workspace is as it was before it started" in output

    assert (repo / "params.yaml").read_bytes() == params_before  # the paper protocol, not the toy one
    assert not (repo / "dvc.lock").exists()
    assert _git(repo, env, "status", "--porcelain") == ""  # nothing staged, nothing modified
    assert (_git(repo, env, "rev-parse", "HEAD"), _git(repo, env, "symbolic-ref", "HEAD")) == head_before
    assert not (repo / "reports").exists() and not (repo / "data").exists()
    deadline = time.monotonic() + 30
    while _processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_in(repo) == []
