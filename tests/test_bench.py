"""A smoke run of bench.py: every benchmark item executes and prints its ratio. Speed itself is
measured by running bench.py by hand (BENCHMARKS.md), not asserted here."""

import os
import re
import subprocess
import sys

from conftest import ROOT, venv_env


def test_quick_bench_prints_every_item(synthetic_root):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--data_root", synthetic_root],
                            cwd=ROOT, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("machine: ")
    assert re.search(r"^1 data path: .* [\d.]+x faster$", out, re.M)
    assert re.search(r"^2 DDP: .* \(gloo\) .* [\d.]+x the time$", out, re.M)
    assert re.search(r"^3 FL overhead per round .* [\d.]+ s +of [\d.]+ s$", out, re.M)
    assert re.search(r"^4 accuracy after 3 rounds: .* 0\.\d+ / 0\.\d+ +0\.\d+ / 0\.\d+", out, re.M)
