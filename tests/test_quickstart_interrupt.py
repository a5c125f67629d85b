"""`medfusion quickstart` stopped by a real signal leaves the workspace as it was: the paper protocol
in params.yaml, no dvc.lock, a clean git status, HEAD on its branch, and no stage process left
running. (The trap this guards against: a SIGTERM that left the quickstart's overrides in
params.yaml, so that the next `dvc repro` silently ran the toy settings.)

The real quickstart is stopped mid-training with SIGTERM (slow); the guard itself
(`medfusion.quickstart.run_guarded`) is checked for every signal it handles against a stand-in for
DVC that dirties the workspace as `dvc exp run` briefly does and ignores the polite SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_repo

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


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM])
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


# A stand-in for `dvc exp run`: it writes the experiment's params into params.yaml, a dvc.lock, stages
# both and detaches HEAD (what DVC does for a moment while it stashes an experiment), then trains
# "forever" in a child process of its group, deaf to SIGINT, so that the guard must escalate.
FAKE_DVC = """
import signal, subprocess, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.SIG_IGN)
Path("params.yaml").write_text("train:\\n  epochs: 1  # the quickstart's toy setting\\n")
Path("dvc.lock").write_text("schema: '2.0'\\n")
subprocess.run(["git", "add", "params.yaml", "dvc.lock"], check=True)
subprocess.run(["git", "checkout", "-q", "--detach"], check=True)
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
print("READY", flush=True)
time.sleep(600)
"""

GUARD = """
import sys
from pathlib import Path
from medfusion import quickstart
quickstart.STOP_GRACE_S = 2.0
try:
    quickstart.run_guarded([sys.executable, "fake_dvc.py"], Path.cwd(), dict(__import__("os").environ))
except quickstart.Interrupted as err:
    print("INTERRUPTED", err.signum, flush=True)
    sys.exit(128 + err.signum)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_the_guard_restores_the_workspace_whatever_stopped_it(tmp_path, signum):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    (repo / "params.yaml").write_text("train:\n  epochs: 100  # the paper protocol\n")
    (repo / "fake_dvc.py").write_text(FAKE_DVC)
    (repo / "guard.py").write_text(GUARD)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    before = (repo / "params.yaml").read_bytes()
    proc = subprocess.Popen([sys.executable, "guard.py"], cwd=repo, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while _git(repo, env, "symbolic-ref", "-q", "HEAD").strip() and time.monotonic() < deadline:
            time.sleep(0.1)  # until the stand-in has dirtied everything (HEAD detached last)
        time.sleep(0.5)
        os.kill(proc.pid, signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum and f"INTERRUPTED {signum}" in out, out
    assert (repo / "params.yaml").read_bytes() == before
    assert not (repo / "dvc.lock").exists()
    assert _git(repo, env, "status", "--porcelain") == ""
    assert _git(repo, env, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    deadline = time.monotonic() + 10
    while _processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_in(repo) == []  # the deaf "stage" was killed with its group


def test_a_commit_made_while_the_experiment_ran_is_left_alone(tmp_path):
    """The snapshot puts back what DVC dirtied, unless the branch moved on since it was taken: then
    the index and files are the user's (a commit made during a two-hour `medfusion reproduce`)."""
    from medfusion.quickstart import WorkspaceSnapshot

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    (tmp_path / "params.yaml").write_text("epochs: 100\n")
    for args in (["init", "-q", "-b", "main"], ["add", "params.yaml"], ["commit", "-qm", "first"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True)
    snapshot = WorkspaceSnapshot.take(tmp_path)
    (tmp_path / "params.yaml").write_text("epochs: 1\n")  # what DVC briefly writes
    snapshot.restore()
    assert (tmp_path / "params.yaml").read_text() == "epochs: 100\n"

    snapshot = WorkspaceSnapshot.take(tmp_path)
    (tmp_path / "new.py").write_text("x = 1\n")
    for args in (["add", "new.py"], ["commit", "-qm", "the user's work"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True)
    snapshot.restore()
    assert _git(tmp_path, env, "status", "--short") == ""  # the index still holds the user's commit
    assert _git(tmp_path, env, "log", "--format=%s", "-1").strip() == "the user's work"


def test_files_committed_while_the_experiment_ran_are_taken_from_head_after_apply(tmp_path):
    """`dvc exp apply` writes the experiment's whole tree: files committed since it started (here
    code.py changed, old.py deleted) would go back to the launch commit's versions."""
    from medfusion.quickstart import restore_committed_since

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True)

    (tmp_path / "code.py").write_text("v = 1\n")
    (tmp_path / "old.py").write_text("x = 0\n")
    git("init", "-q", "-b", "main")
    git("add", ".")
    git("commit", "-qm", "launch")
    launch = _git(tmp_path, env, "rev-parse", "HEAD").strip()
    (tmp_path / "code.py").write_text("v = 2\n")
    git("rm", "-q", "old.py")
    git("commit", "-qam", "the user's work during the run")
    (tmp_path / "code.py").write_text("v = 1\n")  # what the apply writes back
    (tmp_path / "old.py").write_text("x = 0\n")
    assert sorted(restore_committed_since(tmp_path, launch)) == ["code.py", "old.py"]
    assert (tmp_path / "code.py").read_text() == "v = 2\n" and not (tmp_path / "old.py").exists()
    assert _git(tmp_path, env, "status", "--short") == ""
    assert restore_committed_since(tmp_path, None) == []
