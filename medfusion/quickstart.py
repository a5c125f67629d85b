"""`medfusion quickstart`: the whole DVC pipeline at toy size, as a real `dvc exp run`, that leaves the
workspace as it was when it is interrupted.

The experiment runs with `dvc exp run --temp`: DVC copies the repository into .dvc/tmp/exps/ and runs
every stage there, so params.yaml, dvc.lock, data/ and reports/ of the workspace are not touched while
it trains. Only when it has finished are its results brought into the workspace (`dvc exp apply`)
and params.yaml put back to the paper protocol, with SIGINT, SIGTERM and SIGHUP held off for those
few seconds so that they complete or do not start.

Interrupted (Ctrl-C, `kill`, a closed terminal), the DVC process group is asked to stop as Ctrl-C
would ask it (SIGINT: DVC then restores what it had changed, such as the short moment in which it
writes the experiment's params into the workspace to stash them), and killed if it has not stopped
within `STOP_GRACE_S`; then the workspace's params.yaml, dvc.lock, git index and HEAD are put back as
they were before the quickstart began (`WorkspaceSnapshot`), and the command exits with 128 + the signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medfusion.common import atomic_write
from medfusion.config import model_sections
from medfusion.data.sources import restore_links
from medfusion.reproduce import override_value

STOP_GRACE_S = 60.0  # how long DVC may take to stop after SIGINT before it is killed
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Which entries the quickstart trains by default: CASNet, one ablation and a baseline (`--all-models`: all).
DEFAULT_MODELS = {"casnet": ["casnet", "casnet_wo_br"], "baselines": ["unet"]}

# A CPU-sized protocol on the generated datasets; the model widths come from each section's TINY.
PROTOCOL_OVERRIDES = [
    "datasets=[synthetic,synthetic_volumes]",
    "data.image_size=48",
    "data.synthetic.num_images=70",  # 14 test images: the Wilcoxon test with ties is then asymptotic, not 2^13 permutations
    "data.synthetic.num_volumes=8",
    "data.synthetic.slices_per_volume=8",
    "drgo.region_size=16",
    "train.epochs=6",
    "train.compile=off",  # 6 short epochs of tiny models: compiling would cost more than it saves
    "train.batch_size=4",  # 7 optimizer steps per epoch (28 training images): at 4 steps a fold can stall (seen at batch 8)
    "train.lr=0.003",
    "train.patience=10",
    "train.num_workers=0",
    "cv.n_folds=2",
    "cv.seeds=[0]",
]


def tiny_overrides() -> list[str]:
    """`section.key=value` for every model section's TINY widths."""
    return [
        f"{section}.{key}={override_value(value)}"
        for section, cls in model_sections().items()
        for key, value in cls.TINY.items()
    ]


def quickstart_overrides(models: dict[str, list[str]] | None = None) -> list[str]:
    """The quickstart's `-S` overrides: the small protocol, tiny widths, and `models` (None: all of
    params.yaml's entries)."""
    chosen = [f"models.{group}={override_value(names)}" for group, names in (models or {}).items()]
    return PROTOCOL_OVERRIDES + tiny_overrides() + chosen


def _git(root: Path, *args: str, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)
    return out.stdout.strip()


@dataclass(frozen=True)
class WorkspaceSnapshot:
    """What an interrupted `dvc exp run` could leave changed: params.yaml, dvc.lock, the git index
    (DVC stages files) and HEAD (DVC detaches it while it stashes an experiment)."""

    root: Path
    files: dict[str, bytes | None]  # None: the file did not exist
    index_tree: str | None  # `git write-tree`; None where the index could not be written as a tree
    head: str  # the branch HEAD points at (refs/heads/main), or a commit where detached
    commit: str = ""  # the commit HEAD resolved to

    @classmethod
    def take(cls, root: Path) -> WorkspaceSnapshot:
        files = {}
        for name in ("params.yaml", "dvc.lock"):
            path = root / name
            files[name] = path.read_bytes() if path.exists() else None
        tree = _git(root, "write-tree", check=False) or None
        head = _git(root, "symbolic-ref", "-q", "HEAD", check=False) or _git(root, "rev-parse", "HEAD")
        return cls(root, files, tree, head, _git(root, "rev-parse", "HEAD", check=False))

    def restore(self) -> None:
        """Put back what DVC could have left changed. Where the branch has moved on since the
        snapshot (the user committed while the experiment ran), the index and the files are theirs:
        only a detached HEAD is put back on the branch."""
        if self.head.startswith("refs/"):
            moved = _git(self.root, "rev-parse", "-q", "--verify", self.head, check=False) not in (
                "",
                self.commit,
            )
            if moved and self.commit:
                _git(self.root, "symbolic-ref", "HEAD", self.head, check=False)
                return
        for name, content in self.files.items():
            path = self.root / name
            if content is None:
                path.unlink(missing_ok=True)
            elif not path.exists() or path.read_bytes() != content:
                atomic_write(path, content)
        if self.head.startswith("refs/"):
            _git(self.root, "symbolic-ref", "HEAD", self.head, check=False)
        else:
            _git(self.root, "update-ref", "--no-deref", "HEAD", self.head, check=False)
        if self.index_tree:
            _git(self.root, "read-tree", self.index_tree, check=False)


class Interrupted(Exception):
    """A signal arrived while the experiment ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread while inside."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (then they are delivered)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def stop_group(process: subprocess.Popen, grace: float | None = None) -> None:
    """Ask a process group to stop as Ctrl-C would; kill what is left after `grace` seconds
    (default STOP_GRACE_S)."""
    grace = STOP_GRACE_S if grace is None else grace
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; stage processes of its group may still be stopping
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        if not _group_alive(process.pid):
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def run_guarded(cmd: list[str], root: Path, env: dict[str, str]) -> int:
    """Run `cmd` (a `dvc exp run --temp`) in its own process group; on SIGINT, SIGTERM or SIGHUP stop
    it and put the workspace back as it was (raising `Interrupted`). Returns its exit code."""
    snapshot = WorkspaceSnapshot.take(root)
    with signals_raise():
        process = None
        try:
            process = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)
            return process.wait()
        except Interrupted:
            with signals_held():
                if process is not None:
                    stop_group(process)
                snapshot.restore()
            raise


def apply_experiment(
    name: str, root: Path, env: dict[str, str], params_text: bytes, since: str | None = None
) -> bool:
    """Bring the finished experiment's outputs into the workspace and put params.yaml back, with the
    interrupting signals held until both are done. -> whether it was applied.

    `dvc exp apply` writes the experiment's whole tree, so files committed since the experiment
    started (`since`, the commit it ran from) would go back to their old versions: those are taken
    from HEAD again. Where tracked files other than params.yaml, dvc.lock and reports/ have
    uncommitted changes, nothing is applied
    (they would be overwritten): the experiment stays (`dvc exp apply NAME` when ready)."""
    dirty = [f for f in _git(root, "diff", "--name-only", "HEAD", check=False).splitlines()
             if f and not f.startswith("reports/") and f not in ("dvc.lock", "params.yaml")]  # fmt: skip
    if dirty:
        print(f"not applied to the workspace, which has uncommitted changes ({', '.join(dirty[:5])}): "
              f"`dvc exp apply {name}` when ready")  # fmt: skip
        return False
    with signals_held():
        subprocess.run(
            ["dvc", "exp", "apply", name], cwd=root, env=env, check=True, start_new_session=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        atomic_write(
            root / "params.yaml", params_text
        )  # the paper protocol stays the default for `dvc repro`
        restore_committed_since(root, since)
        restore_links(root)  # data/sources/<name>: neither in git nor cached (medfusion/data/sources.py)
    return True


def restore_committed_since(root: Path, since: str | None) -> list[str]:
    """Take from HEAD every file that changed between commit `since` and HEAD (the user's commits
    made while an experiment ran from `since`). -> those paths."""
    if not since:
        return []
    moved = [f for f in _git(root, "diff", "--name-only", since, "HEAD", check=False).splitlines() if f]
    present = [f for f in moved if _git(root, "cat-file", "-t", f"HEAD:{f}", check=False) == "blob"]
    if present:
        _git(root, "checkout", "HEAD", "--", *present)
    for gone in set(moved) - set(present):  # deleted since: deleted again
        (root / gone).unlink(missing_ok=True)
    return moved
