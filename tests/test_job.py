"""End to end: the real `python job.py` in NVFlare's simulator, 2 gloo ranks per site, on the synthetic set."""

import contextlib
import glob
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from conftest import (
    ISOLATED,
    ROOT,
    UNSHARE,
    WritesMarker,
    accuracy_as_the_sites_measure,
    assert_clean,
    assert_learns,
    free_ports,
    jobs_at_once,
    processes_of,
    round_metrics,
    run_job,
    venv_env,
    wait_for_log_lines,
)
from data import load_cifar10, normalize
from job import JOB_NAME, load_global_model
from local_run.race_free_simulator import console_log
from local_run.results import metric, read_final_scores
from model import Net

THREE_SITES = ["site-1", "site-2", "site-3"]  # of three_sites_run


def job_main(monkeypatch, capsys, *args, **env) -> tuple[int, str, str]:
    """`python job.py ARGS` in this process, for what ends before any process starts: (exit code, stdout, stderr)."""
    import job

    monkeypatch.setattr(sys, "argv", ["job.py", *args])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as venv_env: no GPU unless a test asks for one
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = job.main()
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def default_runs(synthetic_root, tmp_path_factory) -> dict:
    """Two jobs of the default settings at once, as a user may start them: in one network, with no port flag. One
    reads the data at a plain path, the other a copy at a path with spaces, quotes and accents. Each: (the finished
    process with its output, its workspace)."""
    folder = tmp_path_factory.mktemp("sim")
    spaced_root = folder / "my set's \u00fcber data"
    shutil.copytree(synthetic_root, spaced_root)
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "torchelastic_*")))
    roots = {"plain": synthetic_root, "spaced": str(spaced_root)}
    workspaces = {name: str(folder / name) for name in roots}
    done = jobs_at_once(
        {
            name: ["--num_rounds", "3", "--data_root", root, "--workspace", workspaces[name]]
            for name, root in roots.items()
        },
    )
    runs = {name: (done[name], workspaces[name]) for name in roots}
    runs["left_in_temp"] = set(glob.glob(os.path.join(tempfile.gettempdir(), "torchelastic_*"))) - temp_before
    return runs


@pytest.fixture(scope="module")
def default_run(default_runs) -> tuple:
    """The job of the default settings at a plain path: (its finished process, its workspace, the torchrun folders
    left in the temporary folder)."""
    return *default_runs["plain"], default_runs["left_in_temp"]


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")  # one worker runs the job once for these tests
def test_job_exits_zero_and_every_site_reports_every_round(default_run):
    result, workspace, _ = default_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = round_metrics(workspace)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2"] for r in rounds)
    for line in ("round  global accuracy", "best global model: after round ", "final global model: after round 2"):
        assert line in result.stdout


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")
def test_the_console_shows_a_line_a_round_and_nvflares_output_is_kept(default_run):
    result, workspace, _ = default_run
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"NVFlare's logs: {workspace}/{JOB_NAME}/server/log.txt")
    assert [line.split(":")[0] for line in lines if ": global accuracy " in line] == ["round 0", "round 1", "round 2"]
    assert len(lines) < 20, result.stdout  # no NVFlare INFO line
    with open(console_log(workspace, JOB_NAME)) as f:
        assert "Round 2 started" in f.read()


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")
def test_each_site_trains_with_two_gloo_ranks(default_run):
    _, workspace, _ = default_run
    for site in ("site-1", "site-2"):
        with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:
            log = f.read()
        assert f"{site}: 2 rank(s), backend gloo on cpu (no CUDA device is visible)" in log
        assert f"{site}: SYNTHETIC stand-in shard of 5000 training images" in log


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")
def test_global_accuracy_climbs_well_above_chance(default_run):
    _, workspace, _ = default_run
    assert_learns(round_metrics(workspace))


def per_round(workspace: str) -> list[tuple[float, float]]:
    return [(metric(r["aggregated_metrics"], "accuracy"), metric(r["aggregated_metrics"], "train_loss"))
            for r in round_metrics(workspace)]  # fmt: skip


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")
def test_the_same_seed_at_a_path_with_spaces_quotes_and_accents_reproduces_every_round(default_runs):
    # The same data at another path, which every rank must get as it is: the same seed, so the same run.
    (result, spaced), (_, plain) = default_runs["spaced"], default_runs["plain"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert per_round(spaced) == per_round(plain)


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")
def test_two_jobs_at_once_on_one_machine_need_no_port_flags(default_runs):
    # Each site's torchrun takes a free port at each launch: with a fixed one, the second job's sites would fail
    # at their rendezvous.
    for name in ("plain", "spaced"):
        result, workspace = default_runs[name]
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert_learns(round_metrics(workspace))
        assert processes_of(workspace) == []


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")
def test_global_models_load_into_net_and_best_is_the_best_round(default_run, synthetic_root):
    _, workspace, _ = default_run
    app = os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server")
    load_global_model(os.path.join(app, "FL_global_model.pt"))
    best = load_global_model(os.path.join(app, "best_FL_global_model.pt"))
    _, _, test_x, test_y = load_cifar10(synthetic_root)
    with torch.no_grad():
        best_accuracy = (best(normalize(test_x)).argmax(1) == test_y).float().mean().item()
    assert best_accuracy == pytest.approx(
        max(metric(r["aggregated_metrics"], "accuracy") for r in round_metrics(workspace)), abs=1e-4
    )


@pytest.mark.e2e
@pytest.mark.xdist_group("default_run")
def test_clean_run_leaves_no_traceback_no_error_and_no_process(default_run):
    _, workspace, left_in_temp = default_run
    assert_clean(workspace)
    assert left_in_temp == set()  # torchrun's log folders
    assert not glob.glob(os.path.join(workspace, "**", "*tfevents*"), recursive=True)  # no tracking asked for


@pytest.fixture(scope="module")
def three_sites_run(small_root, tmp_path_factory):
    """3 sites of 1 rank with tracking and cross-site evaluation, 2 rounds: what the two tests below read."""
    workspace = str(tmp_path_factory.mktemp("three_sites"))
    result = run_job(
        "--num_rounds", "2", "--n_clients", "3", "--nproc_per_node", "1", "--use_tracking", "--cross_site_eval",
        "--data_root", small_root, "--workspace", workspace, "--master_port", str(free_ports(2)),
    )  # fmt: skip
    return result, workspace


@pytest.mark.e2e
@pytest.mark.xdist_group("three_sites_run")  # one worker runs the job once for these tests
def test_tracking_with_three_sites_logs_per_site_scalars(three_sites_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, workspace = three_sites_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(len(r["sites"]) == 3 for r in round_metrics(workspace))
    shards = result.stdout.split("training shards: ")[1].splitlines()[0]
    assert sum(int(part.split()[1]) for part in shards.split(", ")) == 1_500  # the small set's images
    for site in THREE_SITES:
        events = EventAccumulator(os.path.join(workspace, JOB_NAME, "server", "simulate_job", "tb_events", site))
        events.Reload()
        for tag in ("train_loss", "global_accuracy", "local_accuracy"):
            assert [e.step for e in events.Scalars(tag)] == [0, 1], (site, tag)
        histogram = [events.Scalars(f"shard_class_count/{c}")[0].value for c in range(10)]
        assert sum(histogram) == int(shards.split(f"{site} ")[1].split(",")[0])
        with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:
            assert "skip the fed event firing" not in f.read()  # a scalar NVFlare dropped
    assert_clean(workspace)


@pytest.mark.e2e
@pytest.mark.xdist_group("three_sites_run")
def test_cross_site_eval_scores_every_sites_model_and_the_global_ones_on_every_site(three_sites_run):
    result, workspace = three_sites_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    server_dir = os.path.join(workspace, JOB_NAME, "server", "simulate_job")
    path = os.path.join(server_dir, "cross_site_val", "cross_val_results.json")
    with open(path) as f:
        matrix = json.load(f)
    models = [*THREE_SITES, "SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"]
    assert sorted(matrix) == THREE_SITES  # every site scored ...
    assert all(sorted(scores) == sorted(models) for scores in matrix.values())  # ... every model
    # Each site's own model is what it sent in the last round: its local accuracy then.
    last = {s["name"]: metric(s["metrics"], "local_accuracy") for s in round_metrics(workspace)[-1]["sites"]}
    for site in THREE_SITES:
        assert matrix[site][site]["accuracy"] == pytest.approx(last[site], abs=1e-6)
    lines = result.stdout.splitlines()
    header = lines.index(f"cross-site evaluation, accuracy of each model (row) on each site's test set: {path}")
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[header + 2 : header + 2 + len(models)]
    }
    assert rows == {m: [round(matrix[s][m]["accuracy"], 4) for s in THREE_SITES] for m in models}


def test_empty_data_root_fails_fast_naming_prepare_data(tmp_path, monkeypatch, capsys):
    code, _, err = job_main(monkeypatch, capsys, "--data_root", str(tmp_path), "--workspace", str(tmp_path / "ws"))
    assert code == 2 and "prepare_data.sh" in err and "Traceback" not in err


def test_a_sites_wait_for_its_tasks_weights_and_its_result_grows_with_the_model_the_sites_and_a_slower_link():
    import job

    with torch.device("meta"):  # 805 MB of float32 weights, none allocated
        model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(12)])
    # Two sites' results, 1,611 MB, take 1,288 s at 10 Mbit/s: twice that.
    assert job.transfer_timeout(model, 2, 10) == 2577
    assert job.transfer_timeout(model, 4, 10) == 5154
    assert job.transfer_timeout(model, 2, 100) == 300  # 258 s: NVFlare's own default is longer


def test_export_config_writes_one_app_per_site_with_its_rank_count_and_no_fixed_port(tmp_path, monkeypatch, capsys):
    import job

    monkeypatch.setattr(job, "EXPORT_DIR", str(tmp_path))  # not the user's /tmp/nvflare/jobs/job_config
    # GPUs visible to job.py: a local run would pin them, the job for a real system must not.
    code, out, err = job_main(monkeypatch, capsys, "--export_config", "--nproc_per_node", "3,2", "--link_mbit", "0.01",
                              CUDA_VISIBLE_DEVICES="0,1,2,3,4")  # fmt: skip
    assert code == 0, err[-3000:]
    job_dir = os.path.join(tmp_path, JOB_NAME)
    assert f"job folder written to {job_dir}" in out
    with open(os.path.join(job_dir, "meta.json")) as f:
        meta = json.load(f)
    deploy_map = meta["deploy_map"]
    assert "launcher_spec" not in meta  # that is for sites on several nodes (--slurm_nodes)
    for site, ranks in (("site-1", 3), ("site-2", 2)):
        config = glob.glob(os.path.join(job_dir, "**", f"*{site}*", "config", "config_fed_client.json"), recursive=True)
        assert len(config) == 1, deploy_map
        with open(config[0]) as f:
            client_config = json.load(f)
        executor = client_config["executors"][0]["executor"]["args"]
        command = executor["command"]
        # Each site waits for its task's weights, and for the server to take its result, as long as both sites' take
        # over the link given.
        wait = job.transfer_timeout(Net(seed=0), 2, 0.01)
        assert client_config["submit_task_result_timeout"] == executor["task_wait_timeout"] == wait > 300
        assert (
            command[:4] == ["python3", "-u", "-m", "torch.distributed.run"] and f"--nproc_per_node={ranks}" in command
        )
        assert not any("CUDA_VISIBLE_DEVICES" in part for part in command)
        assert f"--site {site}" in " ".join(command)
        # torchrun's standalone rendezvous: a free port at each launch, so two jobs on one site never collide.
        assert "--standalone" in command and not any(part.startswith("--master_port") for part in command)
        custom = os.path.join(os.path.dirname(os.path.dirname(config[0])), "custom")
        assert {"client.py", "data.py", "model.py", "protocol.py", "streaming.py"} <= set(os.listdir(custom))
        assert "streaming.SlowLinkStreaming" in [c["path"] for c in client_config["components"]]
    # The server's process streams the global model to the sites: it gets the slow-link settings too.
    (server_config,) = glob.glob(os.path.join(job_dir, "**", "config_fed_server.json"), recursive=True)
    with open(server_config) as f:
        assert "streaming.SlowLinkStreaming" in [c["path"] for c in json.load(f)["components"]]


def test_nvflare_export_flag_still_works(tmp_path):
    result = run_job("--export", "--export-dir", str(tmp_path / "job"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "job" / JOB_NAME / "meta.json")


@pytest.mark.parametrize(
    "bad",
    [
        ["--num_rounds", "0"],
        ["--num_rounds", "-1"],
        ["--nproc_per_node", "0"],
        ["--batch_size", "0"],
        ["--num_rounds", "five"],
        ["--master_port", "80"],
        ["--seed", "-1"],
        ["--quantize_mode", "int4"],
        ["--link_mbit", "0"],
    ],
)
def test_bad_arguments_get_a_one_line_usage_error(bad, monkeypatch, capsys):
    code, _, err = job_main(monkeypatch, capsys, *bad)
    assert code == 2
    assert "error: argument " + bad[0] in err and "Traceback" not in err


def test_quantizing_numpy_arrays_is_refused(monkeypatch, capsys):
    code, _, err = job_main(monkeypatch, capsys, "--quantize_mode", "bfloat16", "--exchange_format", "numpy")
    assert code == 2
    assert "error: --quantize_mode bfloat16 needs --exchange_format pytorch: NumPy has no bfloat16" in err


def test_ranks_of_a_local_run_share_the_cores():
    from local_run.runner import threads_per_rank

    assert threads_per_rank(ranks=3, cpus=2) == 1  # 3 single-rank sites on 2 cores
    assert threads_per_rank(ranks=2, cpus=16) == 8
    assert threads_per_rank(ranks=4, cpus=2) == 1  # what torchrun sets for 2+ ranks a site anyway


def test_more_min_clients_than_sites_is_refused(monkeypatch, capsys):
    code, _, err = job_main(monkeypatch, capsys, "--n_clients", "2", "--min_clients", "3")
    assert code == 2
    assert "error: --min_clients 3 is more than --n_clients 2" in err and "Traceback" not in err


def test_missing_batch_file_is_named_before_anything_starts(synthetic_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    os.remove(root / "cifar-10-batches-py" / "data_batch_4")
    code, _, err = job_main(monkeypatch, capsys, "--data_root", str(root), "--workspace", str(tmp_path / "ws"))
    assert code == 2
    assert "missing data_batch_4" in err and "prepare_data.sh" in err


@pytest.mark.e2e
def test_corrupt_batch_stops_the_job_naming_the_file(small_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_root, root)
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    started = time.monotonic()
    result = run_job(
        "--n_clients", "1", "--data_root", str(root), "--workspace", str(tmp_path / "ws"), "--master_port",
        str(free_ports(1)), timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert time.monotonic() - started < 120
    # Every rank reads the file; whichever says so first is named.
    assert re.search(rf"site-\d rank \d: ERROR: {re.escape(str(path))} is truncated or corrupt", result.stderr), (
        result.stderr[-3000:]
    )
    assert processes_of(str(tmp_path)) == []


def adjacent_ports() -> tuple[socket.socket, socket.socket]:
    """Two sockets on ports P-1 and P of 127.0.0.1: P listening (taken), P-1 bound with SO_REUSEADDR and not
    listening, which keeps every other process off it and still lets job.py's check (SO_REUSEADDR) find it free."""
    while True:
        free = socket.socket()
        free.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        free.bind(("127.0.0.1", 0))
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", free.getsockname()[1] + 1))
            taken.listen()
            return free, taken
        except OSError:  # P is someone else's: another pair
            free.close()
            taken.close()


def test_taken_master_port_is_named(synthetic_root, tmp_path, monkeypatch, capsys):
    free, taken = adjacent_ports()
    with free, taken:
        port = taken.getsockname()[1]
        code, _, err = job_main(
            monkeypatch, capsys, "--data_root", synthetic_root, "--workspace", str(tmp_path), "--master_port",
            str(port - 1),
        )  # fmt: skip
    assert code == 2
    assert f"port {port} (site-2's torchrun master port) is in use" in err


def test_export_into_unwritable_folder_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_job("--export", "--export-dir", str(blocker / "job"), timeout=120)
    assert result.returncode == 2
    assert "ERROR: can't write the job folder" in result.stderr and "Traceback" not in result.stderr


def test_export_config_into_unwritable_folder_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import job

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(job, "EXPORT_DIR", str(blocker / "job_config"))
    monkeypatch.setattr(sys, "argv", ["job.py", "--export_config"])
    assert job.main() == 2
    assert f"ERROR: can't write the job folder to {blocker / 'job_config'}" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_crashed_run_resumes_from_its_kept_global_model(small_root, tmp_path):
    # 1 rank a site: what is resumed is the global model, whatever the ranks.
    crashed = run_job(
        "--num_rounds", "3", "--nproc_per_node", "1", "--data_root", small_root, "--workspace",
        str(tmp_path / "crashed"), "--master_port", str(free_ports(2)), DDP_EXAMPLE_FAULT="site-2:0:2:kill_torchrun",
    )  # fmt: skip
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    saved = crashed.stderr.split("the global model after round 1 is kept: ")[1].split()[0]
    saved_accuracy = accuracy_as_the_sites_measure(load_global_model(saved), small_root, ranks=1)

    workspace = str(tmp_path / "resumed")
    resumed = run_job(
        "--num_rounds", "2", "--nproc_per_node", "1", "--initial_model", saved, "--data_root", small_root,
        "--workspace", workspace, "--master_port", str(free_ports(2)),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    first = round_metrics(workspace)[0]
    assert [metric(s["metrics"], "accuracy") for s in first["sites"]] == [saved_accuracy] * 2
    final = read_final_scores(os.path.join(workspace, JOB_NAME, "server", "simulate_job"))
    assert min(final.values()) > saved_accuracy + 0.05


def _wrong_shapes(path):
    state = Net().state_dict()
    state["fc3.weight"] = torch.zeros(5, 84)
    torch.save({"model": state}, path)


@pytest.mark.parametrize(
    "write, why",
    [
        (_wrong_shapes, "does not hold the weights of this job's model (size mismatch for fc3.weight"),
        (lambda path: path.write_bytes(os.urandom(4096)), "is not a PyTorch checkpoint"),
        (lambda path: torch.save({"model": WritesMarker(str(path) + ".ran")}, path), "holds more than tensors"),
    ],
)
def test_initial_model_that_is_not_a_net_is_refused_before_anything_starts(write, why, tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.pt"
    write(path)
    code, _, err = job_main(monkeypatch, capsys, "--initial_model", str(path), "--workspace", str(tmp_path / "ws"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ERROR: --initial_model: {path} ") and why in lines[0], lines
    assert not os.path.exists(tmp_path / "ws") and not os.path.exists(str(path) + ".ran")


def listening_sockets(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN that one of `pids` holds, read from /proc."""
    inodes, tables = set(), set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
            tables |= {f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"}  # the tables of the pid's own network
        except OSError:  # it ended meanwhile
            continue
    found = set()
    for table in tables:
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                local, state, inode = (line.split()[i] for i in (1, 3, 9))
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    address, port = local.split(":")
                    raw = bytes.fromhex(address)
                    # The kernel writes each 32-bit word of the address in host (little-endian) order.
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    found.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


@pytest.mark.e2e
def test_a_local_run_listens_on_loopback_only_but_for_torchruns_store(small_root, tmp_path):
    """In a network namespace of its own where the hostname resolves to a non-loopback address, as on many hosts:
    gloo would listen there unless told to use loopback. torchrun's store listens on every interface: torch offers
    no bind address for it (docs/security.md). Where no namespace can be made, on this machine's network as it is."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"198.51.100.1 {socket.gethostname()}\n127.0.0.1 localhost\n")
    setup = f'ip link set lo up && ip addr add 198.51.100.1/32 dev lo && mount --bind {hosts} /etc/hosts && exec "$@"'
    workspace, port = str(tmp_path / "ws"), free_ports(2)
    job = subprocess.Popen(
        [*([*UNSHARE, "--net", "--mount", "sh", "-c", setup, "sh"] if ISOLATED else []), sys.executable,
         os.path.join(ROOT, "job.py"), "--num_rounds", "2", "--nproc_per_node", "2,1", "--data_root", small_root,
         "--workspace", workspace, "--master_port", str(port)],
        cwd=ROOT, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_log_lines(os.path.join(workspace, JOB_NAME, "server", "log.txt"), "Sending task train", 2, 300)
        listening = listening_sockets([int(line.split(":")[0]) for line in processes_of(workspace)])
        stdout, stderr = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert any(seen not in (port, port + 1) for _, seen in listening)  # the ranks' and NVFlare's own were seen
    assert {(address, seen) for address, seen in listening if not is_loopback(address)} == {
        ("::", port),
        ("::", port + 1),
    }


def test_a_workspace_with_a_space_is_refused_for_the_simulator_in_one_line(tmp_path, monkeypatch, capsys):
    # NVFlare 2.9's simulator joins each site's worker command into one string and splits it on spaces: such a run
    # waited 60 s and then ended with "a site did not report".
    code, _, err = job_main(monkeypatch, capsys, "--workspace", str(tmp_path / "a b" / "x"))
    assert code == 2
    assert f"--workspace '{tmp_path / 'a b' / 'x'}' holds a space, which NVFlare's simulator cannot run in" in err
    assert "Traceback" not in err and not (tmp_path / "a b").exists()


def test_another_nvflare_version_is_refused_in_one_line_naming_both(tmp_path, monkeypatch, capsys):
    import nvflare

    import job

    monkeypatch.setattr(nvflare, "__version__", "2.10.1")
    monkeypatch.setattr(sys, "argv", ["job.py", "--export_config", str(tmp_path)])
    assert job.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NVFlare 2.9" in err and "nvflare 2.10.1 is installed" in err
    assert not os.listdir(tmp_path)  # nothing was built
