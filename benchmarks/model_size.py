"""bench.py item 7: models of real size, side by side in one run (BENCHMARKS.md, "Models of real size").

For each size, an MLP of 4096 x 4096 layers, 2 sites x 2 ranks, one SGD step on 8 random samples a round (so that a
round is almost only weight traffic):
- this job: the example's job.py, bridge and server, with the model and a trainer written as
  docs/your-own-model-and-data.md says (DDP; with --fsdp in the sizes given, the same trainer sharded with FSDP2);
  its variants: weights quantized both ways (this-bfloat16, this-blockwise8: --quantize_mode), and a fine-tune that
  trains the last layer only and sends it alone (this-last-layer: the rest frozen, sent once);
- NVFlare's stock job: FedAvgRecipe with the PyTorch exchange format and an external trainer of one process a site
  (receive, load, one step, send);
- the floor: the round's bytes (the model down to and up from every site) serialized as NVFlare does (safetensors)
  and moved through a loopback socket, in one process.
Every process of a run has its RSS sampled every 0.2 s. It writes its own models and needs no data.
With --link_mbit, each job runs in a network namespace of its own with the server's port shaped to that rate each
way (slow_link.py), and the table gives round 1's time and what crossed the link instead of memory.

  python benchmarks/bench.py --items 7  # 64, 256 and 768 MiB in fp32, 768 MiB of layers in bf16 (384 MiB)
  python benchmarks/model_size.py --layers 24 --dtype bfloat16 --ranks 1 --jobs this  # rows of your own
  python benchmarks/model_size.py --layers 1 --rounds 2 --link_mbit 100  # 68 MB over a 100 Mbit/s server link
"""

import argparse
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch
from safetensors.torch import load, save

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, PROJECT)

from slow_link import UNSHARE  # noqa: E402  (this folder: on the path as a script, and in the tests)

from local_run.results import log_times  # noqa: E402

WIDTH = 4096
SLOW_LINK = os.path.join(HERE, "slow_link.py")
SITES = ["site-1", "site-2"]
# The doc's "What to copy".
COPIED = ["flare_ddp.py", "job.py", "protocol.py", "server_fedavg.py", "quantize.py", "streaming.py", "local_run"]
# This job's variants: their job.py flags, and whether they train the last layer alone.
VARIANTS = {
    "this": ([], False),
    "this-fsdp": (["--fsdp"], False),
    "this-bfloat16": (["--quantize_mode", "bfloat16"], False),
    "this-blockwise8": (["--quantize_mode", "blockwise8"], False),
    "this-last-layer": ([], True),
    "this-fsdp-last-layer": (["--fsdp"], True),
}

BIG_MODEL = """
import torch
from torch import nn

LAYERS, WIDTH, DTYPE = {layers}, {width}, torch.{dtype}


class Big(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False, dtype=DTYPE) for _ in range(LAYERS)])

    def forward(self, x):
        return self.layers(x)
"""
# The doc's trainer, cut to one step a round on random samples.
BIG_TRAINER = """
import os
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
import flare_ddp
from big_model import DTYPE, WIDTH, Big

dist.init_process_group("gloo")
model = Big()
if {last_layer}:  # a fine-tune: the last layer trains, the rest is frozen
    model.layers[:-1].requires_grad_(False)
frozen = {{name for name, p in model.named_parameters() if not p.requires_grad}}
if {fsdp}:
    for layer in model.layers:
        fully_shard(layer)
    trainer = fully_shard(model)
else:
    trainer = DDP(model)
x = torch.randn(8, WIDTH, dtype=DTYPE, generator=torch.Generator().manual_seed(dist.get_rank()))
flare_ddp.init()
for task in flare_ddp.tasks(model):
    if task.kind != flare_ddp.TRAIN:
        own = model.state_dict() if task.kind == flare_ddp.SUBMIT_MODEL else None
        task.send(params=own, metrics={{"accuracy": 0.0}})
        continue
    optimizer = torch.optim.SGD([p for p in trainer.parameters() if p.requires_grad], lr=1e-3)
    loss = trainer(x).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    trained = {{k: v for k, v in model.state_dict().items() if k not in frozen}}
    task.send(params=trained, metrics={{"accuracy": 0.0, "train_loss": loss.item()}}, weight=8)
dist.destroy_process_group()
os._exit(0)
"""
JOB_BLOCK = """
TRAIN_SCRIPT = "big_trainer.py"
TRAINER_FILES = ["flare_ddp.py", "big_model.py"]


def initial_model(seed: int) -> torch.nn.Module:
    from big_model import Big

    return Big(seed=seed)


def check_data(data_root: str) -> str | None:
    return None


"""
# NVFlare 2.9's own way, as its examples write it: one process a site. It runs in NVFlare's simulator less its
# start-up race (local_run/race_free_simulator.py), which would otherwise fail some runs before round 0.
STOCK_JOB = """
import sys
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat
from local_run.race_free_simulator import SimEnv
from big_model import Big

recipe = FedAvgRecipe(
    name="stock", model=Big(seed=0), min_clients=2, num_rounds=int(sys.argv[1]), train_script="stock_trainer.py",
    server_expected_format=ExchangeFormat.PYTORCH, launch_external_process=True,
)
recipe.execute(SimEnv(clients=["site-1", "site-2"], workspace_root=sys.argv[2]))
"""
STOCK_TRAINER = """
import torch
import nvflare.client as flare
from nvflare.apis.fl_constant import FLMetaKey
from big_model import DTYPE, WIDTH, Big

flare.init()
model = Big()
x = torch.randn(8, WIDTH, dtype=DTYPE)
while flare.is_running():
    received = flare.receive()
    if received is None:
        break
    model.load_state_dict(received.params)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    # The metric this job's trainer sends too: NVFlare's model selector then saves a best model on both servers.
    metrics = {"accuracy": 0.0}
    flare.send(flare.FLModel(params=model.state_dict(), metrics=metrics, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 8}))
"""


def write_project(folder: str, layers: int, dtype: str, job: str, width: int = WIDTH) -> None:
    """The example made someone's own, as the doc says, with the model and trainer above; and the stock job."""
    os.makedirs(folder)
    for name in COPIED:
        source = os.path.join(PROJECT, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(folder, name), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder)
    files = {
        "big_model.py": BIG_MODEL.format(layers=layers, width=width, dtype=dtype),
        "big_trainer.py": BIG_TRAINER.format(
            fsdp="--fsdp" in VARIANTS.get(job, ([], False))[0], last_layer=VARIANTS.get(job, ([], False))[1]
        ),
        "stock_job.py": STOCK_JOB,
        "stock_trainer.py": STOCK_TRAINER,
    }
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "job.py")) as f:
        job = f.read()
    start, end = job.index("TRAIN_SCRIPT = "), job.index("JOB_NAME = ")
    with open(os.path.join(folder, "job.py"), "w") as f:
        f.write(job[:start] + JOB_BLOCK + job[end:])


class PeakMemory:
    """Samples the RSS of every process under `root` every 0.2 s: the peak of the server process (the one that
    has `server_log` open), of each trainer rank (by torchrun's RANK; the stock trainer is rank 0), and of their sum."""

    def __init__(self, root: psutil.Process, server_log: str, trainer: str):
        self.root, self.server_log, self.trainer = root, server_log, trainer
        self.peaks = {"server": 0, "all": 0}
        self._server_pid = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for p in processes:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    self._note(p, rss)
                except psutil.Error:
                    pass
            self.peaks["all"] = max(self.peaks["all"], total)

    def _note(self, p: psutil.Process, rss: int) -> None:
        if self._server_pid is None and any(f.path == self.server_log for f in p.open_files()):
            self._server_pid = p.pid
        if p.pid == self._server_pid:
            self.peaks["server"] = max(self.peaks["server"], rss)
        elif any(arg.endswith(self.trainer) for arg in p.cmdline()) and "torch.distributed.run" not in p.cmdline():
            key = f"rank {p.environ().get('RANK', '0')}"
            self.peaks[key] = max(self.peaks.get(key, 0), rss)


def run(folder: str, command: list[str], server_log: str, trainer: str, keep_going: bool = False) -> dict:
    """One job: its wall time, its marginal round time (between the server's train tasks after round 0), and the
    peak memory of its processes. A job that fails raises, or with keep_going, is one more result: its exit code
    under "failed" and its output's end under "output"."""
    started = time.time()
    # The stock job's trainers run `python3` from PATH: this interpreter's.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    process = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    memory = PeakMemory(psutil.Process(process.pid), server_log, trainer)
    output, _ = process.communicate(timeout=6 * 3600)
    wall = time.time() - started
    peaks = memory.stop()
    if process.returncode != 0 and not keep_going:
        peaks_mib = {name: mib(value) for name, value in peaks.items()}
        raise RuntimeError(
            f"{' '.join(command)} failed ({process.returncode}), peak RSS MiB {peaks_mib}:\n{output[-3000:]}"
        )
    sends = log_times(server_log, "Sending task train")
    rounds = [b - a for a, b in zip(sends[1:], sends[2:])]  # round 0 holds start-up; the last has no next
    saved = log_times(server_log, "Start persist model on server")  # a round's new global model
    link = re.search(r"slow link: .*: ([\d,]+) bytes down, ([\d,]+) bytes up", output)  # what crossed it
    return {
        "wall": wall,
        "round": sum(rounds) / len(rounds) if rounds else float("nan"),
        # round 1 from its task's going out to its new global model (round 0 holds the trainers' start-up)
        "round 1": saved[1] - sends[1] if len(sends) > 1 and len(saved) > 1 else float("nan"),
        **peaks,
        **({"crossed": (_int(link[1]), _int(link[2]))} if link else {}),
        **({"failed": process.returncode, "output": output[-3000:]} if process.returncode else {}),
    }


def bytes_moved(logs: str, round_: int = 1) -> tuple[int, int]:
    """What round `round_` moved between the server and the sites of a run of this job, measured: (down, up) bytes,
    from what flare_ddp says each site received and sent, or where weights travel quantized, from what the filters
    say they made of them (the server's for each site's task, each site's for its result)."""
    with open(os.path.join(logs, "server", "log.txt")) as f:
        server = f.read()
    down = up = 0
    for site in SITES:
        with open(os.path.join(logs, site, "log.txt")) as f:
            log = f.read()
        received = re.search(rf"flare_ddp: train task of round {round_}: received \d+ tensors, ([\d,]+) bytes", log)
        sent = re.search(rf"flare_ddp: train task of round {round_}: sent \d+ tensors, ([\d,]+) bytes", log)
        down_q = re.findall(rf"peer={site},.*task_name=train,.* tensors quantized to \w+: [\d,]+ -> ([\d,]+)", server)
        up_q = re.findall(r"tensors quantized to \w+: [\d,]+ -> ([\d,]+) bytes", log)
        down += _int(down_q[round_] if down_q else received[1])
        up += _int(up_q[round_] if up_q else sent[1])
    return down, up


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def loopback_seconds(state: dict, times: int) -> float:
    """The floor: serialize `state` as NVFlare's tensor downloader does (safetensors), move it through a loopback
    socket, and load it back, `times` times, in one process."""
    server = socket.create_server(("127.0.0.1", 0))

    def receive() -> None:
        for _ in range(times):
            connection, _ = server.accept()
            with connection:
                data = b"".join(iter(functools.partial(connection.recv, 1 << 22), b""))
            load(data)  # back to tensors, as the receiver does

    reader = threading.Thread(target=receive)
    started = time.perf_counter()
    reader.start()
    for _ in range(times):
        with socket.create_connection(server.getsockname()) as connection:
            connection.sendall(save(state))
    reader.join()
    server.close()
    return time.perf_counter() - started


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def measure(
    layers: int,
    dtype: str,
    rounds: int,
    jobs: list[str],
    ranks: int,
    width: int = WIDTH,
    prefix: list[str] = (),
    link_mbit: float | None = None,
) -> dict:
    """Each job's run with a model of `layers` layers of width x width `dtype` weights; prefix: what each job's
    command line runs under (a network namespace of its own, in the tests); link_mbit: the server's port shaped to
    this rate each way (slow_link.py, in a network namespace of the job's own)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            folder = os.path.join(tmp, job)
            write_project(folder, layers, dtype, job, width=width)
            workspace = os.path.join(tmp, f"{job}-ws")
            if job == "stock":
                command = [sys.executable, "stock_job.py", str(rounds), workspace]
                server_log, trainer = os.path.join(workspace, "stock", "server", "log.txt"), "stock_trainer.py"
            else:
                command = [sys.executable, "job.py", "--num_rounds", str(rounds), "--workspace", workspace,
                           "--nproc_per_node", str(ranks), "--data_root", tmp, *VARIANTS[job][0]]  # fmt: skip
                command += ["--link_mbit", str(link_mbit)] if link_mbit else []  # as its user would
                server_log, trainer = os.path.join(workspace, "pt_ddp_fedavg", "server", "log.txt"), "big_trainer.py"
            under = [*UNSHARE, "--net", sys.executable, SLOW_LINK, str(link_mbit), server_log] if link_mbit else prefix
            # Over a slow link a job may fail (NVFlare's stock job does): that is a result, and its logs are kept.
            results[job] = run(folder, [*under, *command], server_log, trainer, keep_going=bool(link_mbit))
            if results[job].get("failed"):
                kept = tempfile.mkdtemp(prefix=f"model_size-{job}-failed-")
                if os.path.isdir(workspace):
                    shutil.copytree(workspace, kept, dirs_exist_ok=True)
                print(f"{job} failed (exit code {results[job]['failed']}); its logs (if it left any) are in {kept}; "
                      f"its output ended:\n{results[job]['output']}", file=sys.stderr, flush=True)  # fmt: skip
            if job != "stock" and not link_mbit:  # over a slow link: what crossed it instead
                results[job]["moved"] = bytes_moved(os.path.join(workspace, "pt_ddp_fedavg"))
            shutil.rmtree(workspace, ignore_errors=True)
    return results


def rows(layers: int, dtype: str, results: dict, bases: dict, width: int = WIDTH) -> list[str]:
    """Markdown rows, one a job and the floor. bases: each job's peaks with a model of 64 KiB, which a process
    holds whatever the model: the server's peak above it is what the model costs it."""
    model_bytes = layers * width * width * torch.finfo(getattr(torch, dtype)).bits // 8
    moved = 2 * len(SITES) * model_bytes  # the whole model down to and up from every site
    lines = []
    for job, r in results.items():
        above = r["server"] - bases[job]["server"]
        others = [r[k] for k in r if k.startswith("rank ") and k != "rank 0"]
        down, up = r.get("moved", (moved // 2, moved // 2))  # the stock job's: the whole model, computed
        lines.append(
            f"| {mib(model_bytes)} MiB {dtype} | {job} | {r['round']:.1f} | {r['wall']:.1f} | "
            f"{mib(down)} + {mib(up)} | "
            f"{mib(r['server'])} | {mib(above)} ({above / model_bytes:.1f}x) | {mib(r.get('rank 0', 0))} | "
            f"{mib(max(others)) if others else '-'} | {mib(r['all'])} |"
        )
    state = {f"layers.{i}.weight": torch.zeros(width, width, dtype=getattr(torch, dtype)) for i in range(layers)}
    floor = loopback_seconds(state, 2 * len(SITES))
    lines.append(
        f"| {mib(model_bytes)} MiB {dtype} | floor: loopback socket | {floor:.1f} | | {mib(moved)} |" + " |" * 5
    )
    return lines


HEADER = [
    "| model | job | marginal round (s) | whole job (s) | MiB down + up in round 1 | peak RSS server, MiB | server "
    "above its base (x model) | rank 0 | another rank | all processes |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


# The sizes of bench.py item 7: about 70, 270 and 810 MB in float32, and the largest in bf16.
SIZES = [(1, "float32"), (4, "float32"), (12, "float32"), (12, "bfloat16")]


LINK_HEADER = [
    "| link, each way | model | job | round 1 (s) | whole job (s) | MB across the link, down + up, whole job |",
    "|---|---|---|---|---|---|",
]


def link_rows(layers: int, dtype: str, results: dict, mbit: float, width: int = WIDTH) -> list[str]:
    """Markdown rows of a run over a slow link, a job each: round 1 from its task's going out to its new global
    model (the weights down to each site and up again), and what crossed the link in the whole job (framing and
    repeats included; this job's final evaluation sends its last and best models down again)."""
    model_mb = layers * width * width * torch.finfo(getattr(torch, dtype)).bits // 8 / 1e6
    lines = []
    for job, r in results.items():
        round_1 = f"failed (exit code {r['failed']})" if r.get("failed") else f"{r['round 1']:.1f}"
        down, up = (n / 1e6 for n in r.get("crossed", (0, 0)))  # nothing, if the server never listened
        lines.append(f"| {mbit:g} Mbit/s | {model_mb:,.0f} MB {dtype} | {job} | {round_1} | {r['wall']:.1f} | "
                     f"{down:,.0f} + {up:,.0f} |")  # fmt: skip
    return lines


def report(
    sizes: list[tuple[int, str]], rounds: int, jobs: list[str], ranks: int, width: int = WIDTH, link_mbit=None
) -> None:
    """Print the table: each (layers, dtype) of `sizes`, each job; with link_mbit, over a link of that rate."""
    if link_mbit:
        print("\n".join(LINK_HEADER), flush=True)
        for layers, dtype in sizes:
            results = measure(layers, dtype, rounds, jobs, ranks, width, link_mbit=link_mbit)
            print("\n".join(link_rows(layers, dtype, results, link_mbit, width)), flush=True)
        return
    bases = {dtype: measure(1, dtype, rounds, jobs, ranks, width=128) for dtype in {d for _, d in sizes}}
    print("\n".join(HEADER), flush=True)
    for layers, dtype in sizes:
        for line in rows(layers, dtype, measure(layers, dtype, rounds, jobs, ranks, width), bases[dtype], width):
            print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4, 12], help="4096 x 4096 layers of each model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each job")
    p.add_argument("--width", type=int, default=WIDTH, help="each layer is width x width")
    p.add_argument("--ranks", type=int, default=2, help="ranks of each site of this job (the stock job has one)")
    p.add_argument("--jobs", nargs="+", default=["this", "stock"], choices=[*VARIANTS, "stock"], help="jobs to run")
    p.add_argument(
        "--link_mbit",
        type=float,
        help="shape the server's port to this many Mbit/s each way (slow_link.py; root, or unprivileged user "
        "namespaces): transfer times over a slow link instead of memory",
    )
    args = p.parse_args()
    if args.link_mbit and args.rounds < 2:
        p.error("--link_mbit needs --rounds 2 or more: the table gives round 1 (round 0 holds the trainers' start-up)")
    sizes = [(layers, args.dtype) for layers in args.layers]
    report(sizes, args.rounds, args.jobs, args.ranks, args.width, args.link_mbit)


if __name__ == "__main__":
    main()
