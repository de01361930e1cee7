"""A site on several nodes (--slurm_nodes): the exported job as NVFlare's server and Slurm launcher read it, and
a 2-node site on loopback.

On loopback, site-1 of a POC runs as 2 "nodes" of 1 gloo rank each. Its client is started with node 0's share
of the environment that NVFlare's Slurm job launcher gives a node group (NVFL_NNODES, NVFL_NODE_RANK, ...), so
the trainer NVFlare launches for it is node 0. The test starts node 1 itself, as srun would on another host:
NVFlare's own node script, rendered by its Slurm launcher's code from the job's metadata, with SLURM_NODEID=1.
site-2 has no such environment: the same torchrun_node command runs it as one standalone node."""

import functools
import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from zipfile import ZipFile

import pytest
import torch
from nvflare.apis.workspace import Workspace
from nvflare.app_opt.job_launcher.slurm.batch import _render_node_script
from nvflare.app_opt.job_launcher.slurm.config import LaunchPlan
from nvflare.app_opt.job_launcher.slurm.launcher import _resolve_additional_node_command, _resolve_resources
from nvflare.private.fed.server.job_meta_validator import JobMetaValidator
from nvflare.utils.job_launcher_utils import get_job_launcher_spec

from conftest import (
    ROOT,
    assert_learns,
    free_ports,
    job_command,
    network_namespace,
    poc_system,
    processes_left,
    run_job,
    site_weight,
    venv_env,
)
from data import BATCH_DIR, read_pickle, write_pickle
from job import JOB_NAME
from local_run.results import read_rounds
from test_transformer import (
    assert_learns_next_tokens,
    assert_same_model_and_every_parameter_trained,
    comparison,
    full_matrix,
    global_model,
    transformer_project,
)


@functools.cache
def node_group() -> dict[str, str]:
    """What NVFlare's Slurm launcher gives each node of a 2-node site: the group, and its master's port (free)."""
    return {
        "NVFL_NNODES": "2",
        "NVFL_MASTER_ADDR": "127.0.0.1",
        "NVFL_MASTER_PORT": str(free_ports()),
        "NVFL_RUN_ID": "1",
    }


# What every POC process gets: one CPU thread a rank (3 ranks share this machine's cores; torchrun sets this only
# for 2+ ranks a node), and no /tmp/torchelastic_* folder from torchrun_node's torchrun.
QUIET = {"OMP_NUM_THREADS": "1", "PET_LOG_DIR": "/dev/null"}
SLURM_FLAGS = ["--slurm_nodes", "2", "--slurm_gpus_per_node", "1"]
ROUNDS = 3


def exported_meta(tmp_path, *flags) -> tuple[str, dict]:
    result = run_job("--export", "--export-dir", str(tmp_path), "--data_root", "/data", *flags, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job_dir = os.path.join(tmp_path, JOB_NAME)
    with open(os.path.join(job_dir, "meta.json")) as f:
        return job_dir, json.load(f)


def site_command(job_dir: str, site: str) -> list[str]:
    """The trainer command in a site's exported config."""
    with open(os.path.join(job_dir, f"app_{site}", "config", "config_fed_client.json")) as f:
        (executor,) = json.load(f)["executors"]
    return executor["executor"]["args"]["command"]


def test_export_carries_a_launcher_block_that_nvflare_accepts(tmp_path):
    job_dir, meta = exported_meta(tmp_path, "--slurm_nodes", "2", "--slurm_gpus_per_node", "8")
    for site in ("site-1", "site-2"):
        command = site_command(job_dir, site)
        assert command[:6] == ["python3", "-u", "-m", "nvflare.app_opt.pt.torchrun_node", "--nproc-per-node=8",
                               "custom/client.py"]  # fmt: skip
        assert command[command.index("--site") + 1] == site
        block = meta["launcher_spec"][site]["slurm"]
        # Nodes 1..N-1 run the same command as the trainer NVFlare launches on node 0.
        assert block == {"nodes": 2, "gpus_per_node": 8, "additional_node_command": shlex.join(command)}
    # What the server runs on `nvflare job submit`: the job folder, zipped, through NVFlare's job-meta validator.
    archive = tmp_path / "job.zip"
    with ZipFile(archive, "w") as zf:
        for path in glob.glob(os.path.join(job_dir, "**"), recursive=True):
            zf.write(path, os.path.relpath(path, tmp_path))
    valid, error, _ = JobMetaValidator().validate(JOB_NAME, str(archive))
    assert valid, error


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--slurm_nodes", "2"], "--slurm_nodes and --slurm_gpus_per_node go together"),
        (["--slurm_gpus_per_node", "8"], "--slurm_nodes and --slurm_gpus_per_node go together"),
        ([*SLURM_FLAGS, "--nproc_per_node", "4"], "--nproc_per_node and --master_port are for single-node sites"),
        ([*SLURM_FLAGS, "--master_port", "8000"], "--nproc_per_node and --master_port are for single-node sites"),
        (["--slurm_nodes", "0", "--slurm_gpus_per_node", "8"], "argument --slurm_nodes: must be at least 1"),
    ],
)
def test_slurm_flags_that_do_not_fit_get_a_usage_error(flags, says, capsys):
    from job import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_with_slurm_flags_each_node_runs_gpus_per_node_ranks():
    from job import parse_args

    args = parse_args(["--slurm_nodes", "2", "--slurm_gpus_per_node", "8"])
    assert (args.nproc_per_node, args.master_port) == ([8, 8], None)


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    """A POC whose site-1 is node 0 of a 2-node group."""
    env_of = {"server": QUIET, "site-1": {**QUIET, **node_group(), "NVFL_NODE_RANK": "0"}, "site-2": QUIET}
    with poc_system(tmp_path_factory.mktemp("poc"), env_of) as system:
        yield system


def wait_for_new_job(
    project: str, site: str, known: set[str], job: subprocess.Popen, script: str, timeout: float = 180
) -> str:
    """The folder of the job that NVFlare deploys to `site` of a POC's `project` next (one not in `known`), once its
    app's `script` and its whole meta.json are there (NVFlare unzips the app, then writes the metadata)."""
    deadline = time.monotonic() + timeout
    while True:
        scripts = glob.glob(os.path.join(project, site, "*", f"app_{site}", "custom", script))
        jobs = {str(Path(script).parents[2]) for script in scripts}
        new = [job for job in jobs if job not in known and job_meta(job) is not None]
        if new:
            return new[0]
        assert job.poll() is None, f"job.py ended before the job reached {site}"
        assert time.monotonic() < deadline, f"no job reached {site} within {timeout} s"
        time.sleep(0.5)


def job_meta(job_dir: str) -> dict | None:
    """A deployed job's metadata, or None while NVFlare has not written all of it."""
    try:
        with open(os.path.join(job_dir, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def node_script(job_dir: str, site: str) -> str:
    """NVFlare's own script for the nodes of a site's node group, rendered by its Slurm launcher's code (NVFlare
    2.9's private functions: recheck on an upgrade) from the job's metadata as the site received it. On a node
    other than 0 it drops the site's credentials, sets the Cell Client API bootstrap, changes to the job's app
    folder and runs the additional_node_command. Only sbatch and srun are left out."""
    meta = job_meta(job_dir)
    spec = get_job_launcher_spec(meta, site, "slurm")
    resources = _resolve_resources(meta, site, "none", 600.0, spec=spec)  # the launcher's checks of the block
    workspace, job_id = Workspace(os.path.dirname(job_dir), site_name=site), os.path.basename(job_dir)
    command, app_dir = _resolve_additional_node_command(
        spec, resources.nodes, workspace, job_id, workspace.get_run_dir(job_id), True
    )
    plan = LaunchPlan(
        job_id=job_id, site_name=site, run_dir=job_dir, exe_module="", module_args=(), resources=resources,
        directives={}, sandbox="none", image=None, setup="", study_env={}, study_secret_env={}, mounts=(),
        python_path="", python_env="", forward_env=(), additional_node_command=command, node_app_dir=app_dir,
    )  # fmt: skip
    return _render_node_script(plan, None)  # the config is read only for Apptainer


def run_two_node_job(
    poc, tmp_path, *flags, project: str = ROOT, script: str = "client.py", ranks_a_node: int = 1, **node_1_env
) -> dict:
    """`job.py --env prod --slurm_nodes 2 FLAGS` (project's job.py, whose sites run `script`) against the POC, with
    site-1's node 1 started by NVFlare's Slurm node script. Returns job.py's and node 1's exit codes and output, and
    site-1's job folder."""
    known = {os.path.dirname(p) for p in glob.glob(os.path.join(poc.project, "site-1", "*", "meta.json"))}
    out, err, node_log = (open(tmp_path / name, "w+") for name in ("job.out", "job.err", "node1.log"))
    job = subprocess.Popen(
        job_command("--env", "prod", "--startup_kit", poc.kit, "--slurm_nodes", "2", "--slurm_gpus_per_node",
                    str(ranks_a_node), *flags, "--workspace", str(tmp_path), net=poc.net, folder=project),
        cwd=project, env=venv_env(), stdout=out, stderr=err,
    )  # fmt: skip
    node_1 = job_dir = None
    try:
        job_dir = wait_for_new_job(poc.project, "site-1", known, job, script)
        # What srun runs on every node of the allocation, with node 1's SLURM_NODEID and the group's variables.
        node_1 = subprocess.Popen(
            [*poc.net, "bash", "-c", node_script(job_dir, "site-1")], env=venv_env(**QUIET, **node_group(),
            SLURM_NODEID="1", **node_1_env), stdout=node_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        job.wait(timeout=600)
        node_1.wait(timeout=60)
    finally:
        if job.poll() is None and job_dir:  # the test failed first: end the job, or the POC's stop fails on it
            poc.nvflare("job", "abort", os.path.basename(job_dir), "--force", "--startup-kit", poc.kit, timeout=120)
        for process in (job, node_1):
            if process and process.poll() is None:  # ... and leave nothing running
                process.kill()
                process.wait()
    run = {"job_dir": job_dir, "code": job.returncode, "node_1_code": node_1.returncode}
    for name, f in (("stdout", out), ("stderr", err), ("node_1_log", node_log)):
        f.seek(0)
        run[name] = f.read()
        f.close()
    return run


@pytest.mark.e2e
@pytest.mark.xdist_group("two_nodes")  # the tests of one POC run in one worker, which starts it once
def test_a_site_on_two_nodes_trains_over_both(poc, synthetic_root, tmp_path):
    run = run_two_node_job(poc, tmp_path, "--num_rounds", str(ROUNDS), "--data_root", synthetic_root)
    assert run["code"] == 0, run["stdout"][-3000:] + run["stderr"][-3000:]
    assert "ended with status FINISHED:COMPLETED" in run["stdout"]
    assert run["node_1_code"] == 0, run["node_1_log"][-3000:]
    with open(os.path.join(run["job_dir"], "log.txt")) as f:
        assert "site-1: 2 rank(s), backend gloo on cpu (no CUDA device is visible)" in f.read()
    result = run["stdout"].split("; result: ")[1].splitlines()[0]
    rounds = read_rounds(os.path.join(result, "workspace"))
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    for r in rounds:
        sites = {s["name"]: s for s in r["sites"]}
        assert sorted(sites) == ["site-1", "site-2"]
        # The server weighs each site by the samples it trained, whatever its ranks and nodes.
        assert sites["site-1"]["weight"] == site_weight(5000)
        assert sites["site-2"]["weight"] == site_weight(5000)
    assert_learns(rounds)
    assert processes_left(run["job_dir"]) == []


@pytest.mark.e2e
@pytest.mark.xdist_group("two_nodes")
def test_node_1_killed_mid_round_ends_the_job(poc, small_root, tmp_path):
    run = run_two_node_job(
        poc, tmp_path, "--num_rounds", str(ROUNDS), "--data_root", small_root, DDP_EXAMPLE_FAULT="site-1:1:1:kill"
    )
    assert run["code"] == 1, run["stdout"][-3000:] + run["stderr"][-3000:]
    assert run["node_1_code"] != 0
    # job.py's summary, as for any rank that fails on a system it submitted to: the round, and the model kept.
    assert "ERROR: the job stopped in round 1 of 3: a site did not report" in run["stderr"], run["stderr"][-3000:]
    assert "the global model after round 0 is kept" in run["stderr"]
    # Node 0's rank 0 says that a peer went away, and where to look: node 1's output, which names the rank.
    with open(os.path.join(run["job_dir"], "log.txt")) as f:
        assert "site-1 rank 0: ERROR: a peer rank went away (" in f.read()
    assert "site-1 rank 1: injecting fault 'kill' at 1" in run["node_1_log"]
    assert re.search(r"rank\s*: 1 \(local_rank: 0\)\s+exitcode\s*: -9", run["node_1_log"]), run["node_1_log"][-3000:]
    assert processes_left(run["job_dir"]) == []


def test_nodes_that_loaded_different_data_end_the_site_at_once_naming_what_differs(synthetic_root, tmp_path):
    """A site of 2 nodes of 1 rank each, met by torchrun's static rendezvous on loopback; node 1's --data_root holds
    another copy of the data with one label changed, as another host's copy may."""
    other = tmp_path / "other_copy"
    shutil.copytree(synthetic_root, other)
    path = os.path.join(other, BATCH_DIR, "data_batch_3")
    batch = read_pickle(path)
    batch["labels"][0] = (batch["labels"][0] + 1) % 10
    write_pickle(path, batch)
    port = free_ports()
    with network_namespace() as net:  # the two nodes' loopback, of their own
        nodes = []
        for node in (0, 1):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                       "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "--log-dir=/dev/null",
                       os.path.join(ROOT, "client.py"), "--data_root", [synthetic_root, str(other)][node],
                       "--site", "site-1", "--sites", "site-1,site-2"]  # fmt: skip
            nodes.append(subprocess.Popen([*net, *command], env=venv_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
        try:
            outputs = [node.communicate(timeout=120)[0] for node in nodes]
        finally:
            for node in nodes:
                node.kill()
    host = socket.gethostname()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode != 0, output[-3000:]
        # Each rank names what differs, on which ranks and nodes, and only that: not a stuck or lost peer.
        line = re.search(rf"site-1 rank {rank}: ERROR: the ranks of site-1 loaded different data \((.*)\); ", output)
        assert line, output[-3000:]
        assert line.group(1).startswith("labels' sha256: ") and ";" not in line.group(1), line.group(1)
        assert f"on rank 0 ({host})" in line.group(1) and f"on rank 1 ({host})" in line.group(1)
        assert "peer" not in output


@pytest.mark.e2e
@pytest.mark.xdist_group("two_nodes")
def test_a_transformer_hybrid_sharded_over_two_nodes_reaches_ddps_global_model(poc, tmp_path):
    # site-1: 2 nodes x 2 ranks, TinyLM sharded over each node's 2 ranks and replicated across the nodes (a 2-D
    # mesh); site-2: 2 ranks on one node. Beside it, in the simulator, the same job with DDP on 4 and 2 ranks.
    project = transformer_project(tmp_path / "project", keep_optimizer=False)
    flags = comparison(tmp_path)
    reference = subprocess.Popen(
        job_command(*flags, "--nproc_per_node", "4,2", "--workspace", str(tmp_path / "ddp"), folder=project),
        cwd=project, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        run = run_two_node_job(
            poc, tmp_path, *flags, "--fsdp", project=project, script="my_transformer_trainer.py", ranks_a_node=2
        )
        ddp_out, ddp_err = reference.communicate(timeout=600)
    finally:
        reference.kill()
    assert run["code"] == 0, run["stdout"][-3000:] + run["stderr"][-3000:]
    assert run["node_1_code"] == 0, run["node_1_log"][-3000:]
    assert reference.returncode == 0, ddp_out[-3000:] + ddp_err[-3000:]
    workspace = os.path.join(run["stdout"].split("; result: ")[1].splitlines()[0], "workspace")
    hybrid = torch.load(os.path.join(workspace, "app_server", "FL_global_model.pt"), weights_only=True)["model"]
    assert_same_model_and_every_parameter_trained(hybrid, global_model(str(tmp_path / "ddp")))
    matrix = full_matrix(os.path.join(workspace, "cross_site_val", "cross_val_results.json"))
    assert_learns_next_tokens(read_rounds(workspace), matrix["site-1"]["SRV_FL_global_model.pt"]["accuracy"])
    with open(os.path.join(run["job_dir"], "log.txt")) as f:
        assert "site-1: FSDP2 over 2 node(s) x 2 rank(s)" in f.read()
    assert processes_left(run["job_dir"]) == []
