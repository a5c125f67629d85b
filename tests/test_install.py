"""install.py: uv gets the package sources pip is configured with, so both routes install the same builds."""

from __future__ import annotations

import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("install", REPO / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

# `pip config list` on a machine whose pip takes torch's CPU build from a wheel folder
CONFIG = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/elsewhere'
install.index-url='https://mirror.example/simple'
global.index-url='https://ignored.example/simple'
"""


def test_pip_settings_follow_pips_precedence():
    settings = install.pip_settings(CONFIG)
    assert settings == {
        "cert": ["/etc/ssl/certs/ca-certificates.crt"],
        "find-links": ["/opt/wheels"],  # the environment variable beats the global file
        "extra-index-url": ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"],
        "index-url": ["https://mirror.example/simple"],  # [install] beats [global]
    }


def test_uv_gets_every_index_and_takes_each_pin_from_whichever_has_it():
    options = install.uv_options(install.pip_settings(CONFIG))
    assert options == [
        "--index-url", "https://mirror.example/simple",
        "--extra-index-url", "file:///opt/pypi/simple",
        "--extra-index-url", "file:///opt/pypi-more/simple",
        "--find-links", "/opt/wheels",
        "--index-strategy", "unsafe-best-match",
    ]  # fmt: skip
    assert install.uv_options({}) == []  # an unconfigured pip: uv's defaults (PyPI), as pip's


def test_the_readme_and_ci_install_with_it():
    assert "python3 install.py && .venv/bin/medfusion quickstart" in (REPO / "README.md").read_text()
    assert "python3 install.py" in (REPO / ".ci" / "run").read_text()
