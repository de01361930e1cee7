#!/usr/bin/env bash
# Everything a GPU machine checks, in one go: benchmarks/gpu_check.py, then the README's test suite with
# tests/test_gpu.py running. For a machine that has torch but not nvflare: the wheels in .whl/ (NVFlare 2.9.0
# and what it needs beyond torch) are installed first. Logs go to $OUT (default /tmp/gpu_machine).
#   bash benchmarks/gpu_machine.sh [SECONDS]   SECONDS: how long the suite may take (default 420)
# The suite runs as five pytest processes side by side (a bare GPU machine may lack pytest-xdist), each in a network
# namespace of its own; each real run inside them gets one of its own too (tests/conftest.py).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_machine}
limit=${1:-420}
mkdir -p "$OUT"
if ! python3 -c "import nvflare" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl >/tmp/install.log 2>&1 \
    || { tail -20 /tmp/install.log; exit 1; }
fi
{
  date -u
  nvidia-smi -L
  nproc
  python3 -c "import torch, nvflare; print('torch', torch.__version__, 'NCCL', torch.cuda.nccl.version(), 'nvflare', nvflare.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2

python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"

# A fresh network namespace starts with its loopback down; `ip` may be missing, so raise it from Python.
LO_UP='import fcntl, socket, struct; fcntl.ioctl(socket.socket(), 0x8914, struct.pack("16sH", b"lo", 0x41))'
group() {
  name=$1; shift
  unshare --net sh -c 'python3 -c "$0" && exec "$@"' "$LO_UP" timeout "$limit" python3 -m pytest -p no:cacheprovider \
    -rs --durations=10 "$@" >"$OUT/$name.log" 2>&1
  echo "$name: exit $? ($(tail -1 "$OUT/$name.log"))" >>"$OUT/summary.txt"
}
: >"$OUT/summary.txt"
group gpu tests/test_gpu.py &
group job tests/test_job.py &
group faults tests/test_faults.py &
group poc tests/test_deploy.py tests/test_multinode.py &
group rest tests --ignore=tests/test_gpu.py --ignore=tests/test_job.py --ignore=tests/test_faults.py \
  --ignore=tests/test_deploy.py --ignore=tests/test_multinode.py &
wait
cat "$OUT/summary.txt"
! grep -qv ": exit 0 " "$OUT/summary.txt"
