"""The shape of the code: no import cycle in medfusion/, light modules stay light, functions stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """medfusion module -> the medfusion modules it imports, anywhere in its file (a function-level
    import counts: a cycle through one is still a cycle)."""
    files = {_module_name(p): p for p in (REPO / "medfusion").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                while name and name not in files:  # `from medfusion.x import f`: the module is x
                    name = name.rpartition(".")[0]
                if name and name != module:
                    imported.add(name)
        graph[module] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_medfusion():
    assert find_cycle(import_graph()) is None


def test_the_data_layer_does_not_import_the_losses():
    graph = import_graph()
    offenders = {m: sorted(d) for m, d in graph.items() if m.startswith("medfusion.data") and any(
        i.startswith("medfusion.losses") for i in d)}  # fmt: skip
    assert offenders == {}


@pytest.mark.parametrize(
    "module",
    ["medfusion.config", "medfusion.common", "medfusion.quickstart", "medfusion.cli", "medfusion.report",
     "medfusion.stats", "pipeline.source", "pipeline.fetch", "pipeline.preprocess", "pipeline.split", "pipeline.stats",
     "pipeline.report", "pipeline.efficiency"],
)  # fmt: skip
def test_stages_that_do_not_train_import_neither_torch_nor_mlflow(module):
    """Each DVC stage is a fresh process: a stage that does not train must not pay torch's (about 1.5 s)
    and MLflow's (about 1.5 s) imports at start-up. (efficiency imports torch only inside main.)"""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_function_is_longer_than_80_lines():
    long = []
    for folder in ("medfusion", "pipeline"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_run_names_and_telemetry_are_defined_once():
    """`fold{k}_seed{s}` is spelled only by medfusion.common.run_name; the telemetry switches only in
    medfusion.common (and .ci/run, a shell script)."""
    spelled, switched = [], []
    for folder in ("medfusion", "pipeline"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            if path.name != "common.py" and "_seed{" in text and 'f"fold{' in text:
                spelled.append(str(path.relative_to(REPO)))
            if path.name != "common.py" and "MLFLOW_DISABLE_TELEMETRY" in text:
                switched.append(str(path.relative_to(REPO)))
    assert spelled == [] and switched == []


STAGE_SCRIPT = """
import atexit, pathlib, sys, threading, time
import typer
from medfusion.common import run_stage
out = pathlib.Path(sys.argv[1])

def main(fail: bool = False):
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("joined"))).start()
    print("stage output", end="")  # no newline: only a flush gets it out of the buffer
    if fail:
        raise ValueError("bad input")

sys.argv = sys.argv[:1] + sys.argv[2:]
run_stage(main)
"""


@pytest.mark.parametrize("fail", [False, True])
def test_a_stage_ends_without_teardown_but_with_its_callbacks_threads_and_output(tmp_path, fail):
    args = [sys.executable, "-c", STAGE_SCRIPT, str(tmp_path)] + (["--fail"] if fail else [])
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout == "stage output"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    if fail:  # an error leaves through Python's normal exit: traceback and status 1
        assert done.returncode == 1 and "ValueError: bad input" in done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_every_stage_module_ends_through_run_stage():
    for path in sorted((REPO / "pipeline").glob("*.py")):
        if path.name != "__init__.py":
            assert path.read_text().rstrip().endswith('if __name__ == "__main__":\n    run_stage(main)'), path
