"""Ends what a local run started when job.py dies without the chance to end it itself: SIGKILL, the OOM killer,
a CI runner's hard timeout, a notebook's restart. SIGTERM, SIGINT and SIGHUP are job.py's own watchdog's.

    python local_run/keeper.py JOB_PY_PID [FOLDER ...]     (job.py starts it, with a pipe on its standard input)

It runs in a session of its own, so that a signal to job.py's process group does not reach it. Every half second
it notes job.py's descendants: the simulator or the POC, NVFlare's clients, torchrun and the ranks (job.py is their
parent of last resort, so none slips out of its tree). When its standard input closes, job.py has ended: if job.py
ended the run itself, its watchdog has killed this keeper already; if not, the keeper kills every process it noted,
and any they started since, then deletes each FOLDER (the POC workspace of an `--env poc` run). Before that, if
job.py wrote `abort JOB_ID ADMIN_KIT` (a job on its own POC), it aborts that job: NVFlare's job store outlives the
POC workspace, and a job left RUNNING there would make the next POC's `nvflare poc stop` fail."""

import os
import shutil
import subprocess
import sys
import threading

import psutil


def main() -> None:
    job_py, folders = psutil.Process(int(sys.argv[1])), sys.argv[2:]
    said: list[list[str]] = []  # job.py's lines
    ended = threading.Event()

    def listen() -> None:
        for line in sys.stdin:
            said.append(line.split())
        ended.set()

    threading.Thread(target=listen, daemon=True).start()
    noted: dict[int, psutil.Process] = {}
    while not ended.wait(0.5):
        try:
            for p in job_py.children(recursive=True):
                if p.pid != os.getpid():
                    noted.setdefault(p.pid, p)
        except psutil.NoSuchProcess:  # job.py has just ended; its pipe closes next
            pass
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    for _, job_id, kit in (words for words in said if words[:1] == ["abort"]):
        for command in (["abort", job_id, "--force"], ["wait", job_id, "--timeout", "15"]):
            subprocess.run([nvflare, "job", *command, "--startup-kit", kit], capture_output=True, timeout=30)
    end(noted.values())
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def end(processes) -> None:
    """SIGKILL these processes (psutil remembers each one's start time, so a reused pid is spared) and everything
    they started, until none is left."""
    for _ in range(50):
        alive = []
        for p in processes:
            try:
                for q in [p, *p.children(recursive=True)]:
                    if q.status() != psutil.STATUS_ZOMBIE:
                        q.kill()
                        alive.append(q)
            except psutil.NoSuchProcess:  # it ended meanwhile
                pass
        if not alive:
            return
        psutil.wait_procs(alive, timeout=2)


if __name__ == "__main__":
    main()
