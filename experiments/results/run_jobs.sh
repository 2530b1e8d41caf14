#!/usr/bin/env bash
# Run CPU-scale experiment jobs P at a time, one thread each, resumable: each job is one line `NAME ARGS...` on
# stdin (ARGS are jactus-train overrides); it writes $LOG/NAME/summary.json and is skipped when that exists, or when
# another instance sharing $LOG is running it. A claim is an flock on $LOG/NAME.claim held by the job's shell, so
# it ends with the job however the job ends (a killed instance leaves nothing stale; a failed job can be rerun).
#   LOG=logs/x P=2 COMMON="experiment=offline_llama ..." experiments/results/run_jobs.sh < jobs.txt
set -u
cd "$(dirname "$0")/../.."
LOG=${LOG:?set LOG, the directory the runs go to}
P=${P:-2}
BIN=${BIN:-.venv/bin/jactus-train}
COMMON=${COMMON:-}
command -v flock >/dev/null || { echo "run_jobs.sh needs flock (util-linux) to share LOG between instances" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$LOG"

run_one() {
  local name=$1; shift
  if [ -f "$LOG/$name/summary.json" ]; then echo "skip $name (done)"; return; fi
  exec 9>"$LOG/$name.claim"  # this job's shell holds the lock until it exits
  flock -n 9 || { echo "skip $name (claimed by another instance)"; return; }
  if [ -f "$LOG/$name/summary.json" ]; then echo "skip $name (done)"; return; fi  # finished while we waited
  mkdir -p "$LOG/$name"
  local t0=$(date +%s)
  eval "$BIN hydra.mode=RUN $COMMON paths.log_dir=$LOG hydra.run.dir=$LOG/$name $*" > "$LOG/$name.out" 2>&1
  local rc=$?
  echo "$name rc=$rc wall_s=$(( $(date +%s) - t0 ))" | tee -a "$LOG/walltimes.txt"
}

while read -r name args; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  while [ "$(jobs -rp | wc -l)" -ge "$P" ]; do wait -n; done
  run_one "$name" $args &
done
wait
