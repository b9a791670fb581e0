#!/usr/bin/env bash
# Train codi-jax on GPUs: one process per host, every GPU of the host in that process.
#
# One host, several GPUs (FSDP over the GPUs: params, EMA and Adam moments are split across them):
#   launch/multi_gpu.sh configs/sr.py:tiny runs/sr [--config.a.b=v ...]
#
# Several hosts, one process each; the same command on every host (the workdir must be shared):
#   launch/multi_gpu.sh --coordinator_address=host0:12345 --num_processes=2 --process_id=0 CONFIG WORKDIR
#   launch/multi_gpu.sh --coordinator_address=host0:12345 --num_processes=2 --process_id=1 CONFIG WORKDIR
# or under SLURM, which supplies all three (one task per node):
#   srun --nodes=4 --ntasks-per-node=1 launch/multi_gpu.sh --slurm CONFIG WORKDIR
#
# Mesh: one host: --config.mesh.ici="(1,-1,1)"; N hosts: "(N,-1,1)" (data parallel across hosts, FSDP
# inside each), unless --mesh=ICI or a --config.mesh.ici=... of yours says otherwise.
# --dry-run (or DRY_RUN=1) prints the commands instead of running them. See --help and docs/launch.md.
set -euo pipefail

here=${BASH_SOURCE[0]%/*}
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/multi_gpu.sh [options] CONFIG WORKDIR [--config.a.b=v ...] [-- trainer flags]

  --gpus=0,1,2,3                 CUDA_VISIBLE_DEVICES for the process (default: all)   [GPUS]
  --mesh=ICI                     --config.mesh.ici (default (1,-1,1), or (N,-1,1) with N processes;
                                 --mesh=none adds nothing)                              [MESH]
Several hosts (one process per host):
  --coordinator_address=HOST:PORT  process 0's host and a free port                     [COORDINATOR_ADDRESS]
  --num_processes=N                                                                     [NUM_PROCESSES]
  --process_id=I                   0 .. N-1                                             [PROCESS_ID]
  --slurm                        take them from SLURM: SLURM_PROCID, SLURM_NTASKS and the first node
                                 of SLURM_JOB_NODELIST (run with srun --ntasks-per-node=1)
  --port=PORT                    coordinator port with --slurm (default 12345)           [COORDINATOR_PORT]
  --heartbeat_timeout=SECONDS    passed to the trainer
Other:
  --log=FILE                     output is also appended here (default WORKDIR/log.txt, or
                                 WORKDIR/log.process<I>.txt with several processes; for a gs://
                                 workdir codi-log.txt in the repo root)
  --python=PYTHON                default python                                         [PYTHON]
  --dry-run                      print the commands, run nothing                        [DRY_RUN=1]
EOF
}

GPUS=${GPUS:-}
MESH=${MESH:-}
COORDINATOR_ADDRESS=${COORDINATOR_ADDRESS:-}
NUM_PROCESSES=${NUM_PROCESSES:-}
PROCESS_ID=${PROCESS_ID:-}
COORDINATOR_PORT=${COORDINATOR_PORT:-12345}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
SCONTROL=${SCONTROL:-scontrol}
slurm=0
log=''
heartbeat=''
positional=()
trainer_args=()

set_option() { # NAME VALUE, or --FLAG (see parse_args in lib.sh)
  case $1 in
    --slurm) slurm=1 ;;
    gpus) GPUS=$2 ;;
    mesh) MESH=$2 ;;
    coordinator_address) COORDINATOR_ADDRESS=$2 ;;
    num_processes) NUM_PROCESSES=$2 ;;
    process_id) PROCESS_ID=$2 ;;
    port) COORDINATOR_PORT=$2 ;;
    heartbeat_timeout) heartbeat=$2 ;;
    log) log=$2 ;;
    python) PYTHON=$2 ;;
    *) return 1 ;;
  esac
}

script_arg() { # ARG: CONFIG or WORKDIR
  positional+=("$1")
}

parse_args "$@"
[ ${#positional[@]} -eq 2 ] || die "want CONFIG and WORKDIR, got ${#positional[@]} argument(s) (see --help)"
config=${positional[0]}
workdir=${positional[1]}

# first_host NODELIST: the first host of a SLURM node list ("gpu[03-06,09],big1" -> gpu03).
first_host() {
  if command -v "$SCONTROL" >/dev/null 2>&1; then
    local hosts
    hosts=$("$SCONTROL" show hostnames "$1")
    printf '%s' "${hosts%%$'\n'*}"
    return
  fi
  local first=${1%%,*}
  case $1 in
    *\[*)
      local prefix=${1%%\[*} range=${1#*\[}
      case $prefix in *,*) first=${1%%,*} ;; *)
        range=${range%%\]*}
        range=${range%%,*}
        first=$prefix${range%%-*}
        ;;
      esac
      ;;
  esac
  printf '%s' "$first"
}

if [ "$slurm" = 1 ]; then
  require "${SLURM_PROCID:-}" "--slurm but SLURM_PROCID is not set (run under srun)"
  ntasks=${SLURM_NTASKS:-${SLURM_NPROCS:-}}
  require "$ntasks" "--slurm but SLURM_NTASKS is not set (run under srun)"
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$ntasks}}
  [ "$ntasks" = "$nodes" ] || die "--slurm wants one task per node, got $ntasks tasks on $nodes nodes (srun --ntasks-per-node=1)"
  nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
  require "$nodelist" "--slurm but SLURM_JOB_NODELIST is not set"
  PROCESS_ID=$SLURM_PROCID
  NUM_PROCESSES=$ntasks
  [ -n "$COORDINATOR_ADDRESS" ] || COORDINATOR_ADDRESS="$(first_host "$nodelist"):$COORDINATOR_PORT"
fi

dist_args=()
if [ -n "$NUM_PROCESSES$PROCESS_ID$COORDINATOR_ADDRESS" ]; then
  require_int "--num_processes" "$NUM_PROCESSES" 1
  require_int "--process_id" "$PROCESS_ID"
  [ "$PROCESS_ID" -lt "$NUM_PROCESSES" ] || die "--process_id=$PROCESS_ID must be below --num_processes=$NUM_PROCESSES"
  if [ "$NUM_PROCESSES" -gt 1 ]; then
    case $COORDINATOR_ADDRESS in
      ?*:[0-9]*) ;;
      *) die "--coordinator_address=HOST:PORT is needed with $NUM_PROCESSES processes (got '$COORDINATOR_ADDRESS')" ;;
    esac
    dist_args=("--coordinator_address=$COORDINATOR_ADDRESS" "--num_processes=$NUM_PROCESSES" "--process_id=$PROCESS_ID")
  fi
fi
nproc=${NUM_PROCESSES:-1}
if [ -n "$heartbeat" ]; then
  dist_args+=("--heartbeat_timeout=$heartbeat")
fi

mesh_args=()
if ! has_override --config.mesh.ici ${trainer_args[@]+"${trainer_args[@]}"}; then
  case $MESH in
    none) ;;
    '') if [ "$nproc" -gt 1 ]; then mesh_args=("--config.mesh.ici=($nproc,-1,1)"); else mesh_args=("--config.mesh.ici=(1,-1,1)"); fi ;;
    *) mesh_args=("--config.mesh.ici=$MESH") ;;
  esac
fi

if [ -z "$log" ]; then
  logname=log.txt
  [ "$nproc" -eq 1 ] || logname=log.process$PROCESS_ID.txt
  case $workdir in
    gs://*) log=codi-$logname ;; # tee cannot append to a bucket: keep it in the repo root
    *) log=${workdir%/}/$logname ;;
  esac
fi

# Let XLA take what it needs instead of pre-allocating 75% of each GPU up front.
env_args=("XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}")
[ -z "$GPUS" ] || env_args+=("CUDA_VISIBLE_DEVICES=$GPUS")
cmd=(env "${env_args[@]}" "$PYTHON" -m codi_jax.main "--config=$config" "--workdir=$workdir"
  ${dist_args[@]+"${dist_args[@]}"} ${mesh_args[@]+"${mesh_args[@]}"} ${trainer_args[@]+"${trainer_args[@]}"})

# Like launch/single_host.sh: run from the repo root (relative paths are taken from there).
repo=$(cd "$here/.." && pwd)
run cd "$repo"
case $workdir in
  gs://*) ;;
  *) run mkdir -p "$workdir" ;;
esac
case $log in
  */*) [ "${log%/*}" = "${workdir%/}" ] || run mkdir -p "${log%/*}" ;;
esac
if is_dry_run; then
  echo "$(qjoin "${cmd[@]}") 2>&1 | $(qjoin tee -a "$log")"
else
  echo "+ $(qjoin "${cmd[@]}")" >&2
  "${cmd[@]}" 2>&1 | tee -a "$log"
fi
