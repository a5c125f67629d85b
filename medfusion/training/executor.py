"""Where run_cv's pending (fold, seed) runs train: the `executor` section of params.yaml.

- local, processes 1 (the default): one after another in this process, as before;
- local, processes N > 1: N at a time on this machine, each a submitit LocalExecutor job (a fresh
  Python process); on a machine with GPUs each job sees one of them (CUDA_VISIBLE_DEVICES, round
  robin over the job slots); processes 0 = one slot per visible GPU;
- slurm: one submitit job array (`map_array`), one array task per run, with executor.slurm's resources.

Jobs are submitted as `TrainRun()`, a submitit Checkpointable: a task that slurm preempts, or that
reaches its time limit (executor.slurm.timeout_min; at most executor.slurm.max_requeues times), is
requeued and continues from the run's last.pt.

Every way trains a run with the same function, `train_run`, which writes the run's directory and
result.json exactly as a serial run does; the executor section is in no run's hash (`Entry.run_hash`), so
a run trained on slurm counts as finished for a local rerun and the other way round. The parent
waits for every job, then raises one error naming each failed (fold, seed) and its log file; the runs
that finished keep their result.json, so rerunning the stage retrains only the failed ones.
summary.json is written by run_cv once all runs are back.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from submitit.helpers import Checkpointable

from medfusion.common import UserError, run_name
from medfusion.config import ExecutorParams, SlurmParams
from medfusion.data.io import write_json
from medfusion.entries import Entry, Resources
from medfusion.provenance import code_fingerprint, environment, git_state
from medfusion.training.fold import RESUME_FILE, LogFn, run_fold
from medfusion.training.tracking import repo_root

# (fold, seed, run params) -> context manager yielding a log callback; the pipeline passes MLflow's
RunTracker = Callable[[int, int, dict[str, Any]], AbstractContextManager[LogFn]]

# submitit's LocalExecutor kills a job after 2 minutes unless told otherwise: a year
LOCAL_TIMEOUT_MIN = 60 * 24 * 365
POLL_S = 0.5  # how often the local scheduler looks for a finished job


class ExecutorError(UserError, RuntimeError):
    """A run that could not be trained by the chosen executor, with the key or job that caused it."""


@dataclasses.dataclass(frozen=True)
class RunJob:
    """Everything one (fold, seed) run needs, picklable: submitit sends it to another process or
    node. The tracker goes as it is; an MLflow `Tracker` pickles without its client and reconnects
    by URI on the other side (Tracker.__setstate__), so each job opens its own child run."""

    entry: Entry
    processed_dir: Path
    split: dict
    fold: int
    seed: int
    run_dir: Path
    digest: str  # Entry.run_hash: result.json's config_hash
    tracker: RunTracker
    resources: Resources = Resources()
    torch_threads: int | None = None  # local jobs compute with the parent's thread count: same numbers

    @property
    def name(self) -> str:
        return run_name(self.fold, self.seed)


def train_run(job: RunJob) -> dict:
    """Train one run and write its result.json (last: the run counts as finished only then).

    Top-level so that submitit pickles it by reference; it is also what the serial path calls, so
    every executor writes the same files."""
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    run_params = {"fold": job.fold, "seed": job.seed, "config_hash": job.digest}
    with job.tracker(job.fold, job.seed, run_params) as log:
        result = run_fold(
            job.entry,
            job.processed_dir,
            job.split,
            job.fold,
            job.seed,
            job.run_dir,
            log,
            job.resources,
            resume_key=job.digest,
        )
        result["config_hash"] = job.digest
        fingerprint, files = code_fingerprint()
        git = git_state()
        result |= {"code_fingerprint": fingerprint, "git_commit": git["commit"], "git_dirty": git["dirty"]}
        result["code_files"] = files  # per file, so that a retrain can say which changed
        result["environment"] = environment()  # versions; the full list goes to MLflow (environment.txt)
        result["mlflow_run_id"] = getattr(log, "run_id", None)
        tag = getattr(log, "tag", None)
        if tag is not None:  # how the run computed, beside its metrics
            tag({k: v for k, v in result.items() if k in HOW_KEYS})
        files = getattr(log, "files", None)
        if files is not None:  # its history, settings and a link to its checkpoint
            files(job.run_dir, {**job.entry.config(), **run_params})
        write_json(job.run_dir / "result.json", result)
    (job.run_dir / RESUME_FILE).unlink(missing_ok=True)
    return result


HOW_KEYS = (
    "device", "amp_dtype", "channels_last", "precision_reason", "compile", "compile_reason",
    "code_fingerprint", "git_commit", "git_dirty",
)  # fmt: skip


class TrainRun(Checkpointable):
    """`train_run` as submitit runs it. When slurm preempts the task or its time limit is near
    (submitit asks for USR2 before the limit), submitit calls `checkpoint`, which Checkpointable
    answers with the same call, `self(job)`, and requeues the task: the requeued task's train_run
    resumes from last.pt, the state after the last finished epoch (the epoch under way is trained
    again, with the same numbers). Time-limit requeues are capped by executor.slurm.max_requeues;
    preemptions are not counted. Nothing needs saving at the signal: last.pt is written every epoch."""

    def __call__(self, job: RunJob) -> dict:
        return train_run(job)


def run_pending(jobs: Sequence[RunJob], settings: ExecutorParams, name: str) -> dict[tuple[int, int], dict]:
    """Train the pending runs with the `executor` settings; their results by (fold, seed). `name`
    (dataset/entry) names the stage's job folder and slurm array. Paths are made absolute: a job may
    start in another directory. Outside this process the jobs' tracker must pickle (cloudpickle):
    MLflow's `Tracker.child` does; a callable defined in a module the job cannot import (a test file)
    does not."""
    jobs = [
        dataclasses.replace(
            job, processed_dir=Path(job.processed_dir).resolve(), run_dir=Path(job.run_dir).resolve()
        )
        for job in jobs
    ]
    if not jobs:
        return {}
    folder = job_folder(settings, name)
    if settings.kind == "slurm":
        return _run_slurm(jobs, settings.slurm, folder, f"medfusion-{name.replace('/', '-')}")
    if settings.processes == 1:
        return {(job.fold, job.seed): train_run(job) for job in jobs}
    gpus = visible_gpus()
    processes = settings.processes or _one_per_gpu(gpus)
    threads = torch.get_num_threads()
    jobs = [dataclasses.replace(job, torch_threads=threads) for job in jobs]
    return _run_local(jobs, processes, gpus, folder)


def job_folder(settings: ExecutorParams, name: str) -> Path:
    """submitit's files of one train stage (`name` = dataset/entry); relative folders are taken from the
    repo root (DVC_ROOT), so that runs of a `dvc exp run --temp` workspace leave their logs where they
    can be read."""
    folder = Path(settings.folder)
    return (folder if folder.is_absolute() else repo_root() / folder) / name


def visible_gpus() -> list[int]:
    """The GPU indices this process may use, as LocalExecutor's `visible_gpus` wants them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(torch.cuda.device_count()))
    gpus = []
    for token in (t.strip() for t in listed.split(",")):
        if token.startswith(("GPU-", "MIG-")):
            raise ExecutorError(
                f"CUDA_VISIBLE_DEVICES = {listed!r} names GPUs by UUID; executor.processes != 1 needs "
                "their indices (e.g. 0,1) to give each job its own GPU"
            )
        if not token.isdigit():
            break  # CUDA ignores the list from the first invalid entry on (-1 hides every GPU)
        gpus.append(int(token))
    return gpus


def _one_per_gpu(gpus: list[int]) -> int:
    if not gpus:
        raise ExecutorError(
            "executor.processes = 0 trains one run per visible GPU, but no GPU is visible "
            f"(CUDA_VISIBLE_DEVICES = {os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "set executor.processes to the number of runs to train at a time"
        )
    return len(gpus)


def _gpu_parameters(gpus: Sequence[int], slot: int) -> dict[str, Any]:
    """LocalExecutor sets CUDA_VISIBLE_DEVICES from these: one GPU per job slot, or none."""
    if not gpus:
        return {"gpus_per_node": 0}
    return {"gpus_per_node": 1, "visible_gpus": (gpus[slot % len(gpus)],)}


def _run_local(jobs: list[RunJob], processes: int, gpus: list[int], folder: Path) -> dict:
    """At most `processes` LocalExecutor jobs at a time (LocalExecutor itself starts every job at once)."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    queue, running, finished = deque(jobs), {}, []
    print(f"executor: {len(jobs)} runs, {processes} at a time on this machine; logs in {folder}")
    try:
        while queue or running:
            for slot in range(processes):
                if slot not in running and queue:
                    job = queue.popleft()
                    parameters = _gpu_parameters(gpus, slot)
                    executor.update_parameters(**parameters)
                    handle = executor.submit(TrainRun(), job)
                    running[slot] = (job, handle)
                    gpu = parameters.get("visible_gpus", ("none",))[0]
                    print(f"executor: {job.name} started as job {handle.job_id} (GPU {gpu})")
            time.sleep(POLL_S)
            for slot, (job, handle) in list(running.items()):
                if handle.done():
                    finished.append(running.pop(slot))
                    print(f"executor: {job.name} ended ({len(finished)}/{len(jobs)})")
    except BaseException:  # Ctrl-C or a dying stage: leave no orphan training processes
        for _, handle in running.values():
            handle.cancel()
        raise
    return _collect(finished)


def slurm_parameters(settings: SlurmParams, name: str) -> dict[str, Any]:
    """AutoExecutor parameters of one array task = one run on one node: submitit's generic names
    where it has them, slurm_ ones otherwise; unset (null, 0 GPUs, no setup) keys are left out."""
    parameters = {
        "name": name,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": settings.gpus_per_node or None,
        "cpus_per_task": settings.cpus_per_task,
        "mem_gb": settings.mem_gb,
        "timeout_min": settings.timeout_min,
        "slurm_partition": settings.partition,
        "slurm_account": settings.account,
        "slurm_array_parallelism": settings.array_parallelism,
        "slurm_setup": list(settings.setup) or None,
    }
    return {key: value for key, value in parameters.items() if value is not None}


def slurm_executor(settings: SlurmParams, folder: Path, name: str) -> Any:
    """A submitit AutoExecutor for slurm with executor.slurm's resources; a clear error off a cluster."""
    import submitit

    try:
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=settings.max_requeues
        )
    except RuntimeError as err:
        raise ExecutorError(
            f"executor.kind = 'slurm' but slurm is not reachable from here ({err}); run the stage on a "
            "login node of the cluster, or set executor.kind: local"
        ) from err
    executor.update_parameters(**slurm_parameters(settings, name))
    return executor


def _run_slurm(jobs: list[RunJob], settings: SlurmParams, folder: Path, name: str) -> dict:
    """One job array; the stage waits for all its tasks (DVC records the outputs only then)."""
    handles = slurm_executor(settings, folder, name).map_array(TrainRun(), jobs)
    array_id = handles[0].job_id.split("_")[0]
    print(f"executor: {len(jobs)} runs submitted as slurm array {array_id}; logs in {folder}")
    try:
        for handle in handles:
            handle.wait()
    except BaseException:  # the stage stops: so do its queued and running tasks
        for handle in handles:
            try:
                handle.cancel(check=False)
            except OSError:
                pass
        raise
    return _collect(list(zip(jobs, handles, strict=True)))


def _collect(finished: list[tuple[RunJob, Any]]) -> dict[tuple[int, int], dict]:
    """The finished jobs' results, or one error that names every failed run and its log file."""
    results, failures = {}, []
    for job, handle in finished:
        error = handle.exception()
        if error is None:
            results[job.fold, job.seed] = handle.result()
        else:
            failures.append(
                f"  {job.name} (fold {job.fold}, seed {job.seed}), job {handle.job_id}: {_reason(error)}\n"
                f"    log: {handle.paths.stderr}"
            )
    if failures:
        raise ExecutorError(
            f"{len(failures)} of {len(finished)} runs failed:\n"
            + "\n".join(failures)
            + "\nThe other runs finished and keep their result.json: rerunning the stage retrains "
            "only the failed ones."
        )
    return results


def _reason(error: Exception) -> str:
    """The exception line of a job's traceback (submitit wraps it in a long message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if len(line) >= 10 and set(line) == {"-"}]
    if len(rules) >= 2 and rules[1] > rules[0] + 1:  # FailedJobError: the trace sits between two rules
        return lines[rules[1] - 1]
    return lines[0] if lines else type(error).__name__
