#!/usr/bin/env bash
# Starts the job N times and counts the runs that failed, and among them the runs whose sites were mixed up at
# start-up (a trainer set up under another site's name: a .client_api_bootstrap file missing under app_<other>).
# Use, from the project root with the venv active and the data prepared (bash prepare_data.sh --synthetic):
#   bash benchmarks/startup_stress.sh N [--force-race] [more job.py flags]
# Each run is `python job.py --num_rounds 1` in a fresh workspace. --force-race puts tests/force_race on
# PYTHONPATH, which makes both sites hand over their names in the same instant: without race_free_simulator.py's
# fix, every run then mixes its sites up. Prints one line a run and a total; keeps the logs of failed runs.
set -u
cd "$(dirname "$0")/.."
n=${1:?usage: bash benchmarks/startup_stress.sh N [--force-race] [job.py flags]}; shift
if [ "${1:-}" = "--force-race" ]; then
  export PYTHONPATH="$PWD/tests/force_race${PYTHONPATH:+:$PYTHONPATH}"; shift
fi
failed=0; mixed=0
for i in $(seq 1 "$n"); do
  ws=$(mktemp -d /tmp/startup-stress.XXXX)
  python job.py --num_rounds 1 --workspace "$ws" "$@" >"$ws.log" 2>&1; rc=$?
  m=0
  grep -oE "/site-[0-9]+/simulate_job/app_site-[0-9]+/\.client_api_bootstrap" "$ws.log" \
    | sed -E 's#^/(site-[0-9]+)/simulate_job/app_(site-[0-9]+)/.*#\1 \2#' | awk '$1 != $2 {m = 1} END {exit !m}' && m=1
  [ $rc -ne 0 ] && failed=$((failed + 1))
  mixed=$((mixed + m))
  echo "run $i: exit $rc$([ $m = 1 ] && echo ', sites mixed up at start-up')  (log: $ws.log)"
  [ $rc -eq 0 ] && rm -rf "$ws" "$ws.log"
done
echo "$n runs: $failed failed, $mixed of them with sites mixed up at start-up"
