"""Install medfusion into a virtual environment with the exact versions of requirements.lock.

    python3 install.py                 # .venv, with uv where it can be had, else pip
    python3 install.py --pip           # pip only
    python3 install.py --venv DIR

Both routes install the same pinned versions without resolving anything (`--no-deps`: the lock is
closed under its packages' requirements, tests/test_lock.py) and byte-compile what they install:

    python3 -m venv .venv
    .venv/bin/pip install uv==UV_VERSION
    .venv/bin/uv pip install --python .venv/bin/python --no-deps --compile-bytecode -r requirements.lock -e .
  or, with --pip or where uv cannot be installed or fails:
    .venv/bin/pip install --no-deps -r requirements.lock -e .

uv unpacks and compiles in parallel: on 2 cores about 33 s against pip's 99 s (reports/benchmarks.md).
uv does not read pip's configuration (pip.conf, PIP_* variables). Where pip is told to take packages
from a folder or another index (a CPU build of torch from a wheel folder, a CPU index, a company
mirror), the same find-links, index-url and extra-index-url are passed to uv, so that both routes
install the same builds; pip's certificate file becomes uv's SSL_CERT_FILE.

The commands are printed on stderr. An existing DIR is reused, as `python3 -m venv` reuses it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

UV_VERSION = "0.13.10"
ROOT = Path(__file__).resolve().parent
# pip's settings that say where packages come from, as uv's options
PIP_TO_UV = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}
# pip's precedence: environment variables over the install section over the global one
SECTION_RANK = {":env:": 2, "install": 1, "global": 0}


def pip_settings(config_list: str) -> dict[str, list[str]]:
    """{setting: values} of `pip config list` output (`section.key='value'` lines), for the settings
    in PIP_TO_UV and `cert`, each from the section that pip itself would use."""
    best: dict[str, tuple[int, list[str]]] = {}
    for line in config_list.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or key not in (*PIP_TO_UV, "cert") or section not in SECTION_RANK:
            continue
        values = shlex.split(value)[0].split() if value.strip() else []
        rank = SECTION_RANK[section]
        if key not in best or rank > best[key][0]:
            best[key] = (rank, values)
    return {key: values for key, (_, values) in best.items()}


def uv_options(settings: dict[str, list[str]]) -> list[str]:
    """uv's options for pip's index settings. With more than one index, uv takes each pinned version
    from whichever index has it (pip's behaviour), not only from the first index that lists the name."""
    options = [
        opt for key, flag in PIP_TO_UV.items() for value in settings.get(key, []) for opt in (flag, value)
    ]
    if settings.get("extra-index-url"):
        options += ["--index-strategy", "unsafe-best-match"]
    return options


def run(cmd: list[str], env: dict | None = None) -> int:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def install(venv: Path, use_uv: bool = True) -> int:
    python, pip = venv / "bin" / "python", venv / "bin" / "pip"
    if run([sys.executable, "-m", "venv", str(venv)]) != 0:
        return 1
    locked = ["--no-deps", "-r", "requirements.lock", "-e", "."]
    if use_uv and run([str(pip), "install", "--quiet", f"uv=={UV_VERSION}"]) == 0:
        config = subprocess.run([str(pip), "config", "list"], capture_output=True, text=True).stdout
        settings = pip_settings(config)
        env = dict(os.environ)
        if settings.get("cert"):
            env.setdefault("SSL_CERT_FILE", settings["cert"][0])
        uv = [str(venv / "bin" / "uv"), "pip", "install", "--python", str(python), "--compile-bytecode"]
        if run(uv + uv_options(settings) + locked, env) == 0:
            return 0
        print("install.py: uv failed (above); installing with pip instead", file=sys.stderr)
    elif use_uv:
        print(f"install.py: uv=={UV_VERSION} could not be installed; installing with pip", file=sys.stderr)
    return run([str(pip), "install", *locked])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--venv", type=Path, default=ROOT / ".venv", help="the virtual environment (default .venv)"
    )
    parser.add_argument("--pip", action="store_true", help="install with pip only (no uv)")
    args = parser.parse_args(argv)
    return install(args.venv, use_uv=not args.pip)


if __name__ == "__main__":
    sys.exit(main())
