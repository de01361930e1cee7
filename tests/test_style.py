"""The linter and formatter configured in ruff.toml are clean on the whole tree, so the test command
keeps the style without anyone asking."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

RUFF = os.path.join(os.path.dirname(sys.executable), "ruff")


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(command):
    result = subprocess.run([RUFF, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff {' '.join(command)} (fix with: ruff check --fix . && ruff format .)\n" + (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
