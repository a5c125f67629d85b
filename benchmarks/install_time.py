"""How long installing requirements.lock into a fresh venv takes, by route, with empty caches.

    python benchmarks/install_time.py                       # every route
    python benchmarks/install_time.py --routes install.py pip

Each route builds its own venv in a temporary folder, with pip's and uv's caches pointed at empty
temporary folders (so every package is fetched again from its index or wheel folder, as on a fresh
machine; the user's caches are left alone). Routes:

- install.py: the README's install (uv, byte-compiled; pip where uv cannot be had)
- pip: `pip install --no-deps -r requirements.lock -e .` with the venv's own pip (Python's bundled one)
- pip-upgraded: the same after `pip install -U pip` in the venv
- uv-no-compile: install.py's uv command without --compile-bytecode (where PYTHONDONTWRITEBYTECODE=1,
  as on some machines, every process then compiles what it imports again)

Prints the machine and a markdown table of wall seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUTES = ("install.py", "pip", "pip-upgraded", "uv-no-compile")


def _install_module():
    spec = importlib.util.spec_from_file_location("install", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands(route: str, venv: Path) -> list[list[str]]:
    pip, locked = str(venv / "bin" / "pip"), ["--no-deps", "-r", "requirements.lock", "-e", "."]
    new_venv = [sys.executable, "-m", "venv", str(venv)]
    if route == "install.py":
        return [[sys.executable, "install.py", "--venv", str(venv)]]
    if route == "pip":
        return [new_venv, [pip, "install", "--quiet", *locked]]
    if route == "pip-upgraded":
        return [new_venv, [pip, "install", "--quiet", "-U", "pip"], [pip, "install", "--quiet", *locked]]
    install = _install_module()
    config = subprocess.run(["pip", "config", "list"], capture_output=True, text=True).stdout
    uv = [str(venv / "bin" / "uv"), "pip", "install", "--python", str(venv / "bin" / "python")]
    return [
        new_venv,
        [pip, "install", "--quiet", f"uv=={install.UV_VERSION}"],
        uv + install.uv_options(install.pip_settings(config)) + locked,
    ]


def time_route(route: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="install-time-") as tmp:
        env = {**os.environ, "PIP_CACHE_DIR": f"{tmp}/pip-cache", "UV_CACHE_DIR": f"{tmp}/uv-cache"}
        start = time.perf_counter()
        for cmd in commands(route, Path(tmp) / "venv"):
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode:
                print(f"{route}: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return time.perf_counter() - start, done.returncode
        return time.perf_counter() - start, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from medfusion.hardware import machine_summary

    print(machine_summary(), "\n")
    print("| route | s | exit |\n|---|---|---|")
    for route in args.routes:
        seconds, code = time_route(route)
        print(f"| {route} | {seconds:.1f} | {code} |", flush=True)


if __name__ == "__main__":
    main()
