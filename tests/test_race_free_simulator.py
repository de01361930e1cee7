"""race_free_simulator.py: NVFlare 2.9.0's simulator without the start-up race that sets one site up under another's
name. The race is forced here, not waited for: both client threads write their names before either sends."""

import io
import os
import threading
from types import SimpleNamespace

import nvflare
import pytest
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

from conftest import ROOT, free_ports, round_metrics, run_job
from local_run import race_free_simulator

FORCE_RACE = os.path.join(ROOT, "tests", "force_race")


def hand_over(names: list[str]) -> dict[str, dict]:
    """What each of two client threads sends its worker, when both have written build_ctx before either sends: the
    two steps of SimulatorClientRunner.do_one_task (lines 771 and 780 of nvflare 2.9.0), on a real runner."""
    runner = SimulatorClientRunner("", SimpleNamespace(workspace="/nowhere", set=[]), [], {}, None, {"shared": 1})
    both_named = threading.Barrier(len(names), timeout=10)
    sent = {}

    def do_one_task(name):
        runner.build_ctx["client_name"] = name
        both_named.wait()
        sent[name] = dict(runner.build_ctx)

    threads = [threading.Thread(target=do_one_task, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent


@pytest.fixture
def unpatched(monkeypatch):
    """NVFlare's own SimulatorClientRunner for the test, whatever the test installs on it."""
    monkeypatch.setattr(SimulatorClientRunner, "build_ctx", None, raising=False)
    monkeypatch.delattr(SimulatorClientRunner, "build_ctx")


def test_unfixed_the_forced_race_sends_both_workers_one_name(unpatched):
    sent = hand_over(["site-1", "site-2"])
    assert sent["site-1"]["client_name"] == sent["site-2"]["client_name"]  # the bug, made certain


def test_fixed_each_worker_gets_its_own_name(unpatched):
    assert race_free_simulator.patch_simulator()
    sent = hand_over(["site-1", "site-2"])
    assert sent == {name: {"shared": 1, "client_name": name} for name in ("site-1", "site-2")}


def test_refuses_to_run_if_nvflare_changed_the_code_it_corrects(unpatched, monkeypatch):
    monkeypatch.setattr(SimulatorClientRunner, "do_one_task", lambda self, client: None)
    with pytest.raises(race_free_simulator.SimulatorChanged, match="delete the module or update it"):
        race_free_simulator.patch_simulator()


def test_another_nvflare_version_runs_unpatched_and_says_so(unpatched, monkeypatch, capsys):
    monkeypatch.setattr(nvflare, "__version__", "2.10.0")
    assert not race_free_simulator.patch_simulator()
    assert "checked against nvflare 2.9.0, not 2.10.0" in capsys.readouterr().err
    assert "build_ctx" not in SimulatorClientRunner.__dict__


@pytest.mark.parametrize("quiet", [True, False])
def test_a_quiet_simulator_shows_its_warnings_and_errors_and_keeps_everything(quiet, capsys):
    lines = ["t - INFO - round 1\n", "t - WARNING - slow\n", "  banner\n", "t - ERROR - lost a site\n",
             "ERROR: nvflare's SimulatorClientRunner.do_one_task is not the code ...\n"]  # fmt: skip
    kept = io.StringIO()
    race_free_simulator.SimEnv(clients=["site-1"], quiet=quiet)._copy(iter(lines), kept)
    assert kept.getvalue() == "".join(lines)
    assert capsys.readouterr().err == ("".join(lines[1::2]) + lines[4] if quiet else "".join(lines))


def test_job_py_starts_every_site_when_the_race_is_forced(small_root, tmp_path):
    workspace = str(tmp_path)
    result = run_job(
        "--num_rounds", "1", "--data_root", small_root, "--workspace", workspace,
        "--master_port", str(free_ports(2)), timeout=300, PYTHONPATH=FORCE_RACE,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [sorted(s["name"] for s in r["sites"]) for r in round_metrics(workspace)] == [["site-1", "site-2"]]
