#!/usr/bin/env bash
# The video sweeps (benchmarks/video_sweep.py) on a GPU machine, in one run of under 9 minutes:
# a tiny run of each recipe alone first (it writes the moving-digits data into the cache the
# others then share), then every sweep at once, several processes each.
#
#   bash benchmarks/gpu_video_sweep.sh OUTDIR RUNSDIR
set -u
out=${1:?OUTDIR}
runs=${2:?RUNSDIR}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out" "$runs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
sweep() { $py benchmarks/video_sweep.py --sweep "$1" --runs "$runs/$1" --out "$out/$1_$2.json" "${@:3}"; }
limit=${SWEEP_LIMIT_S:-480}
start=$(date +%s)
left() { echo $((limit - ($(date +%s) - start))); }
tiny="--extra --train.steps 5 --eval.samples 8"  # warm-up runs: they only fill the cache
timeout "$(left)" bash -c "$(declare -f sweep); py=$py out=$runs runs=$runs/warm
  sweep mcm warm --only plain-cd $tiny; sweep vdot warm --only default $tiny
  sweep blade warm --only default $tiny"
echo "==== warm done after $(( $(date +%s) - start )) s"
t=$(left)
timeout "$t" bash -c "$(declare -f sweep); py=$py out=$out runs=$runs
  sweep mcm all --parallel 9 --only plain-cd plain-cd-2000 diff-mix-2000 default-2000 \
    bce-0.003-2000 bce-0.001-2000 raw-bce-0.003-2000 cfg2-plain-cd-2000 cfg2-bce-0.003-2000" > "$runs/mcm.log" 2>&1 &
timeout "$t" bash -c "$(declare -f sweep); py=$py out=$out runs=$runs
  sweep vdot cached --parallel 2 --only default cfg4" > "$runs/vdot.log" 2>&1 &
timeout "$t" bash -c "$(declare -f sweep); py=$py out=$out runs=$runs
  sweep vdot new --parallel 3 --warm teacher-4000-lr1e-3 --only teacher-4000-lr1e-3 \
    teacher-4000-lr1e-3-cfg4 teacher-4000-lr1e-3-1000" > "$runs/vdot_new.log" 2>&1 &
timeout "$t" bash -c "$(declare -f sweep); py=$py out=$out runs=$runs
  sweep blade all --parallel 3 --only default steps-1000 steps-1000-batch-16" > "$runs/blade.log" 2>&1 &
wait
echo "==== all done after $(( $(date +%s) - start )) s"
tail -n 25 "$runs"/*.log
