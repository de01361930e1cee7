"""A large tensor over a slow server link, in real runs: this job and NVFlare's stock job side by side, each in a
network namespace of its own whose server ports alone are shaped (tests/shape_server_link.py). The long variant, at
several link rates and model sizes, is the benchmark's (docs/performance.md, Slow links)."""

import os
import subprocess
import sys

import pytest

from conftest import ISOLATED, ROOT, UNSHARE, assert_clean, kill, processes_of, venv_env
from job import JOB_NAME
from local_run.results import NVFLARE_MODEL_SAVED

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import model_size  # noqa: E402

pytestmark = pytest.mark.e2e

SHAPER = os.path.join(ROOT, "tests", "shape_server_link.py")
WIDTH = 1448  # the frozen backbone: one 1448 x 1448 float32 layer, a single tensor of 8 MiB
# The server's link, each way. 2 sites share it: the backbone takes each site about 3.7 minutes. The stock job's
# first acknowledgement can only come after its whole 8 MiB message, far beyond NVFlare's 5 s retry wait; this job's
# 2 MiB window takes 56 s at a fair share, and stays under its 120 s retry wait down to a quarter of the link.
RATE = "600kbit"


HEAD = "        self.head = nn.Linear(WIDTH, 4, dtype=DTYPE)\n"


def fine_tune_project(folder: str) -> None:
    """benchmarks/model_size.py's project as a fine-tune: the large layer frozen, a small head that trains. Only the
    head goes back to the server, and after a site's first task only the head goes out to it; the backbone crosses
    the slow link once, in one task. The stock job sends and returns the whole model."""
    model_size.write_project(folder, 1, "float32", "this-last-layer", width=WIDTH)
    edits = {
        "big_model.py": [
            ("for _ in range(LAYERS)])\n", "for _ in range(LAYERS)])\n" + HEAD),
            ("return self.layers(x)", "return self.head(self.layers(x))"),
        ],
        "big_trainer.py": [("model.layers[:-1].requires_grad_(False)", "model.layers.requires_grad_(False)")],
    }  # fmt: skip
    for name, changes in edits.items():
        path = os.path.join(folder, name)
        with open(path) as f:
            text = f.read()
        for old, new in changes:
            assert text.count(old) == 1, (name, old)
            text = text.replace(old, new)
        with open(path, "w") as f:
            f.write(text)


@pytest.mark.skipif(not ISOLATED, reason="shaping the server's link needs a network namespace of its own (unshare)")
def test_a_tensor_that_takes_minutes_to_reach_each_site_arrives_where_the_stock_job_fails(tmp_path):
    runs = {}
    for job in ("this", "stock"):
        folder, workspace = str(tmp_path / job), str(tmp_path / f"{job}-ws")
        fine_tune_project(folder)
        command = (
            ["job.py", "--num_rounds", "1", "--nproc_per_node", "1", "--data_root", str(tmp_path), "--workspace",
             workspace] if job == "this" else ["stock_job.py", "1", workspace]
        )  # fmt: skip
        runs[job] = (
            subprocess.Popen([*UNSHARE, "--net", sys.executable, SHAPER, RATE, sys.executable, *command], cwd=folder,
                             env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            workspace,
        )  # fmt: skip
    try:
        ours, workspace = runs["this"]
        out, err = ours.communicate(timeout=900)
        stock, stock_workspace = runs["stock"]
        stock_ended = stock.poll()
    finally:
        for process, folder in runs.values():
            kill(processes_of(folder))
            process.kill()
            process.wait()
    assert ours.returncode == 0, out[-3000:] + err[-3000:]
    assert "shape_server_link: the server's ports" in err  # the link was shaped
    logs = os.path.join(workspace, JOB_NAME)
    for site in ("site-1", "site-2"):
        with open(os.path.join(logs, site, "log.txt")) as f:
            log = f.read()
        # The backbone, in pieces, once: with the head in the round's task, the head alone in the final one.
        assert f"train task of round 0: received 3 tensors, {WIDTH * WIDTH * 4 + WIDTH * 4 * 4 + 4 * 4:,} bytes" in log
        assert "validate task of round 0: received 2 tensors" in log and "1 kept from earlier tasks" in log
        assert "Received duplicate chunk" not in log  # nothing was sent twice
    assert_clean(logs)
    # NVFlare's stock job, under the same shaping: its chunks went again and again, and its round had not finished.
    assert stock_ended != 0
    stock_logs = os.path.join(stock_workspace, "stock")
    with open(os.path.join(stock_logs, "server", "log.txt")) as f:
        assert NVFLARE_MODEL_SAVED not in f.read()
    for site in ("site-1", "site-2"):
        with open(os.path.join(stock_logs, site, "log.txt")) as f:
            assert "Received duplicate chunk" in f.read(), site
