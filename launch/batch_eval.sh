#!/usr/bin/env bash
# Evaluate finished runs again: for each WORKDIR, `python -m codi_jax.main --config=CONFIG --workdir=WORKDIR`,
# which finds every training stage complete, skips to the evaluation and rewrites WORKDIR/metrics.json
# and the grids. Then a summary (TSV: workdir, status, metrics.json, log) is written and printed.
#
#   launch/batch_eval.sh --config=configs/sr.py:tiny runs/sr_a runs/sr_b [--config.a.b=v ...] [-- trainer flags]
#   launch/batch_eval.sh --config=configs/sr.py:tiny --parallel=2 runs/*
#   # 4 hosts (or 4 GPUs, one CUDA_VISIBLE_DEVICES each), each taking every 4th workdir of the same list:
#   launch/batch_eval.sh --config=configs/sr.py:tiny --shard=$I --num_shards=4 runs/*
#
# Use the config and overrides the runs were trained with: a workdir whose stages are not complete
# under them would be trained further. Workdirs without a CoDi checkpoint (WORKDIR/codi/checkpoints)
# are skipped unless --allow_untrained. Relative paths are taken from the current directory.
# --dry-run (or DRY_RUN=1) prints the commands instead of running them. See --help and docs/launch.md.
set -euo pipefail

here=${BASH_SOURCE[0]%/*}
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/batch_eval.sh --config=CONFIG [options] WORKDIR... [--config.a.b=v ...] [-- trainer flags]

  --config=CONFIG          the config the runs were trained with, e.g. configs/sr.py:tiny   [CONFIG]
  --workdirs_file=FILE     more workdirs, one per line: "WORKDIR [CONFIG]" (CONFIG overrides
                           --config for that line; blank lines and # comments are skipped)
  --shard=I --num_shards=N this host takes workdirs I, I+N, I+2N, ... of the list (0-based, in
                           the order given; every host must be given the same list)  [SHARD, NUM_SHARDS]
  --parallel=K             K evaluations at once on this host (default 1)           [PARALLEL]
  --summary=FILE           default batch_eval_summary.tsv (.shardIofN.tsv with shards)  [SUMMARY]
  --log_dir=DIR            one log per workdir (default batch_eval_logs)            [LOG_DIR]
  --python=PYTHON          default python                                           [PYTHON]
  --allow_untrained        also run workdirs without WORKDIR/codi/checkpoints (trains them!)
  --dry-run                print the commands, run nothing                          [DRY_RUN=1]
EOF
}

CONFIG=${CONFIG:-}
SHARD=${SHARD:-0}
NUM_SHARDS=${NUM_SHARDS:-1}
PARALLEL=${PARALLEL:-1}
SUMMARY=${SUMMARY:-}
LOG_DIR=${LOG_DIR:-batch_eval_logs}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
allow_untrained=0
workdirs_files=()
workdirs=()     # the whole list, in order
configs=()      # per workdir ('' = --config)
trainer_args=()

set_option() { # NAME VALUE, or --FLAG (see parse_args in lib.sh)
  case $1 in
    --allow-untrained | --allow_untrained) allow_untrained=1 ;;
    config) CONFIG=$2 ;;
    workdirs_file) workdirs_files+=("$2") ;;
    shard) SHARD=$2 ;;
    num_shards) NUM_SHARDS=$2 ;;
    parallel) PARALLEL=$2 ;;
    summary) SUMMARY=$2 ;;
    log_dir) LOG_DIR=$2 ;;
    python) PYTHON=$2 ;;
    *) return 1 ;;
  esac
}

script_arg() { # ARG: a WORKDIR
  workdirs+=("$1")
  configs+=('')
}

parse_args "$@"

for f in ${workdirs_files[@]+"${workdirs_files[@]}"}; do
  [ -f "$f" ] || die "--workdirs_file=$f: no such file"
  while read -r wd cfg rest || [ -n "${wd:-}" ]; do
    case $wd in '' | '#'*) continue ;; esac
    case $cfg in '#'*) cfg='' rest='' ;; esac
    case $rest in '' | '#'*) ;; *) die "$f: want 'WORKDIR [CONFIG]' per line, got '$wd $cfg $rest'" ;; esac
    workdirs+=("$wd")
    configs+=("$cfg")
  done <"$f"
done

require_int --num_shards "$NUM_SHARDS" 1
require_int --shard "$SHARD"
[ "$SHARD" -lt "$NUM_SHARDS" ] || die "--shard=$SHARD must be below --num_shards=$NUM_SHARDS"
require_int --parallel "$PARALLEL" 1
[ ${#workdirs[@]} -gt 0 ] || die "no workdirs given (WORKDIR... or --workdirs_file=FILE)"
for i in "${!workdirs[@]}"; do
  [ -n "${configs[i]}$CONFIG" ] || die "no config for ${workdirs[i]} (--config=FILE.py:VARIANT or CONFIG=...)"
done
if [ -z "$SUMMARY" ]; then
  SUMMARY=batch_eval_summary.tsv
  [ "$NUM_SHARDS" -eq 1 ] || SUMMARY=batch_eval_summary.shard${SHARD}of$NUM_SHARDS.tsv
fi

# abs PATH: relative paths from the caller's directory (the jobs run in the repo root).
caller_dir=$PWD
abs() {
  case $1 in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$caller_dir" "${1#./}" ;;
  esac
}

# abs_config FILE.py[:VARIANT]: the file made absolute when it exists here; else left for the repo root.
abs_config() {
  local file=${1%%:*}
  if [ -f "$(abs "$file")" ]; then
    printf '%s%s' "$(abs "$file")" "${1#"$file"}"
  else
    printf '%s' "$1"
  fi
}

# The jobs of this shard.
sel=()
for i in "${!workdirs[@]}"; do
  [ $((i % NUM_SHARDS)) -ne "$SHARD" ] || sel+=("$i")
done
SUMMARY=$(abs "$SUMMARY")
LOG_DIR=$(abs "$LOG_DIR")
case $PYTHON in */*) PYTHON=$(abs "$PYTHON") ;; esac
repo=$(cd "$here/.." && pwd)
note "shard $SHARD of $NUM_SHARDS: ${#sel[@]} of ${#workdirs[@]} workdirs; logs in $LOG_DIR"

# job_cmd I: sets `cmd` (argv) and `log` for workdir I.
job_cmd() {
  local i=$1 wd cfg name
  wd=$(abs "${workdirs[i]%/}")
  cfg=$(abs_config "${configs[i]:-$CONFIG}")
  name=${wd#*://}
  name=${name//[!A-Za-z0-9._-]/_}
  name=${name##_}
  [ ${#name} -le 80 ] || name=${name:${#name}-80}
  log=$LOG_DIR/$(printf '%03d' "$i")_$name.log
  cmd=("$PYTHON" -m codi_jax.main "--config=$cfg" "--workdir=$wd" ${trainer_args[@]+"${trainer_args[@]}"})
}

# skip_reason I: why workdir I is skipped ('' = run it).
skip_reason() {
  local wd
  wd=$(abs "${workdirs[$1]%/}")
  case $wd in *://*) return ;; esac
  if [ ! -d "$wd" ]; then
    echo "skipped: no such directory"
  elif [ "$allow_untrained" != 1 ] && [ ! -d "$wd/codi/checkpoints" ]; then
    echo "skipped: no codi/checkpoints (not a finished run; --allow_untrained runs it anyway)"
  fi
}

# run_one I: run job I; its exit status goes to LOG.rc (run_one itself never fails).
run_one() {
  local rc=0
  job_cmd "$1"
  "${cmd[@]}" >"$log" 2>&1 </dev/null || rc=$?
  echo "$rc" >"$log.rc"
}

statuses=()
run cd "$repo"
[ ${#sel[@]} -eq 0 ] || run mkdir -p "$LOG_DIR"
pids=()
if [ "$PARALLEL" -gt 1 ] && ! is_dry_run; then
  # Background jobs ignore Ctrl-C without job control: give each its own process group and stop
  # those groups (and only those) on Ctrl-C or TERM.
  set -m
  stop_jobs() {
    local p
    for p in ${pids[@]+"${pids[@]}"}; do
      kill -TERM -- "-$p" 2>/dev/null || true
    done
    exit 130
  }
  trap stop_jobs INT TERM
fi
for i in ${sel[@]+"${sel[@]}"}; do
  reason=$(skip_reason "$i")
  if [ -n "$reason" ]; then
    note "${workdirs[i]}: $reason"
    statuses[i]=$reason
    continue
  fi
  job_cmd "$i"
  if is_dry_run; then
    echo "$(qjoin "${cmd[@]}") > $(q "$log") 2>&1"
    statuses[i]=dry-run
    continue
  fi
  rm -f "$log.rc"
  note "+ $(qjoin "${cmd[@]}") > $(q "$log") 2>&1"
  if [ "$PARALLEL" -eq 1 ]; then
    run_one "$i"
  else
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do
      wait -n 2>/dev/null || wait
    done
    run_one "$i" &
    pids+=($!)
  fi
done
wait

# Summary: one line per workdir of this shard.
failed=0
lines="workdir	status	metrics	log"
for i in ${sel[@]+"${sel[@]}"}; do
  job_cmd "$i"
  wd=$(abs "${workdirs[i]%/}")
  status=${statuses[i]:-}
  metrics=$wd/metrics.json
  if [ -z "$status" ]; then
    rc=$(cat "$log.rc" 2>/dev/null || echo '?')
    rm -f "$log.rc"
    if [ "$rc" = 0 ]; then status=ok; else status="failed (exit $rc)"; fi
  fi
  case $status in dry-run | ok) ;; *) failed=$((failed + 1)) ;; esac
  case $status:$wd in
    dry-run:* | *:*://*) ;;
    *) [ -f "$metrics" ] || metrics="missing ($metrics)" ;;
  esac
  case $status in skipped*) log=- ;; esac
  lines+=$'\n'"${workdirs[i]}	$status	$metrics	$log"
done
if is_dry_run; then
  note "summary (not written, dry run) would go to $SUMMARY:"
  note "$lines"
else
  mkdir -p "${SUMMARY%/*}"
  printf '%s\n' "$lines" >"$SUMMARY"
  printf '%s\n' "$lines"
  note "summary: $SUMMARY"
fi
if [ "$failed" -gt 0 ]; then
  note "$failed of ${#sel[@]} workdirs not evaluated"
  exit 1
fi
