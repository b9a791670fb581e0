#!/usr/bin/env bash
# Train codi-jax on a Cloud TPU VM pod slice (v4-32, v5p-64, v6e-16, ...): one process per TPU VM
# worker, all started with --multihost (jax.distributed reads the pod from the TPU VM metadata).
#
#   launch/tpu_pod.sh SUBCOMMAND [options] [--config.a.b=v ...] [-- more trainer flags]
#
#   create   gcloud compute tpus tpu-vm create
#   install  copy the code (--tarball) or clone it (--repo_url) on every worker, then make a Python
#            venv there with uv and pip-install the repo and jax[tpu]
#   run      start the trainer in the background (nohup) on every worker; output goes to
#            ~/codi-run.log on each worker. Running it again resumes from the workdir's checkpoints.
#   logs     follow worker 0's log until its run ends; exits with the run's exit status
#   stop     stop the run on every worker
#   delete   gcloud compute tpus tpu-vm delete
#   all      create, install, run, logs (and delete when the run succeeded, with --delete_when_done)
#
# Examples:
#   launch/tpu_pod.sh all --name=codi-v4 --zone=us-central2-b --accelerator_type=v4-32 \
#       --tarball=/tmp/codi-jax.tar.gz --config=configs/sr.py:tiny --workdir=gs://my-bucket/runs/sr \
#       --config.codi.mode=pe -- --heartbeat_timeout=120
#   DRY_RUN=1 launch/tpu_pod.sh run ...      # print the commands instead of running them
#
# Every option also reads an environment variable (in brackets); options win. See --help and
# docs/launch.md.

# The worker scripts are built as text: '$x' in single quotes is meant for the worker's shell.
# shellcheck disable=SC2016,SC2088
set -euo pipefail

here=${BASH_SOURCE[0]%/*}
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh {create|install|run|logs|stop|delete|all} [options] [--config.a.b=v ...] [-- trainer flags]

TPU VM (environment variable in brackets):
  --name=NAME                TPU name (required)                                [TPU_NAME]
  --zone=ZONE                e.g. us-central2-b (required)                      [ZONE]
  --project=PROJECT          GCP project (default: gcloud's)                    [PROJECT]
  --accelerator_type=TYPE    e.g. v4-32, v5p-64, v6e-16 (required by create)    [ACCELERATOR_TYPE]
  --runtime_version=VERSION  default from the type: tpu-ubuntu2204-base (v2-v4),
                             v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
                                                                                [RUNTIME_VERSION]
  --create_flag=FLAG         extra flag for create, repeatable (e.g. --create_flag=--spot)
  --ssh_flag=FLAG            extra flag for ssh/scp, repeatable (e.g. --ssh_flag=--internal-ip)
Code (install; one of the two):
  --tarball=FILE             local tarball of the repo, copied to every worker   [TARBALL]
                             (e.g. git archive --format=tar.gz -o /tmp/codi-jax.tar.gz HEAD)
  --repo_url=URL             git URL cloned on every worker                     [REPO_URL]
  --repo_ref=REF             branch, tag or commit (default: the default branch) [REPO_REF]
  --python_version=V         Python made by uv on the workers (default 3.12)     [PYTHON_VERSION]
  --jax_spec=SPEC            default 'jax[tpu]>=0.6,<0.13'                       [JAX_SPEC]
Run:
  --config=CONFIG            e.g. configs/sr.py:tiny (required by run)           [CONFIG]
  --workdir=DIR              checkpoints etc.; gs://bucket/path or a path that all
                             workers share (required by run)                     [WORKDIR]
  --env=KEY=VALUE            environment variable for the trainer, repeatable
  --config.a.b=v, and anything after --, go to the trainer unchanged (--multihost is added).
Worker paths, relative to the home directory unless absolute:
  --remote_dir=DIR           the code (default codi-jax)                         [REMOTE_DIR]
  --venv_dir=DIR             the venv (default codi-venv)                        [VENV_DIR]
  --log_file=FILE            the run's log (default codi-run.log; FILE.pid, FILE.exit beside it) [LOG_FILE]
Other:
  --log_worker=N|all         worker whose log `logs` follows (default 0)         [LOG_WORKER]
  --delete_when_done         all: delete the TPU when the run exits with status 0 [DELETE_WHEN_DONE=1]
  --dry-run                  print the commands, run nothing                     [DRY_RUN=1]
  gcloud binary: [GCLOUD] (default gcloud)
EOF
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
TARBALL=${TARBALL:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
JAX_SPEC=${JAX_SPEC:-'jax[tpu]>=0.6,<0.13'}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
REMOTE_DIR=${REMOTE_DIR:-codi-jax}
VENV_DIR=${VENV_DIR:-codi-venv}
LOG_FILE=${LOG_FILE:-codi-run.log}
LOG_WORKER=${LOG_WORKER:-0}
DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-0}
DRY_RUN=${DRY_RUN:-0}
GCLOUD=${GCLOUD:-gcloud}
create_flags=()
ssh_flags=()
run_env=()
trainer_args=()
subcommand=''

set_option() { # NAME VALUE, or --FLAG (see parse_args in lib.sh)
  case $1 in
    --delete-when-done | --delete_when_done) DELETE_WHEN_DONE=1 ;;
    name) TPU_NAME=$2 ;;
    zone) ZONE=$2 ;;
    project) PROJECT=$2 ;;
    accelerator_type) ACCELERATOR_TYPE=$2 ;;
    runtime_version | version) RUNTIME_VERSION=$2 ;;
    create_flag) create_flags+=("$2") ;;
    ssh_flag) ssh_flags+=("$2") ;;
    tarball) TARBALL=$2 ;;
    repo_url) REPO_URL=$2 ;;
    repo_ref) REPO_REF=$2 ;;
    python_version) PYTHON_VERSION=$2 ;;
    jax_spec) JAX_SPEC=$2 ;;
    config) CONFIG=$2 ;;
    workdir) WORKDIR=$2 ;;
    env)
      case $2 in
        [A-Za-z_]*=*) ;;
        *) die "--env wants KEY=VALUE, got '$2'" ;;
      esac
      run_env+=("$2")
      ;;
    remote_dir) REMOTE_DIR=$2 ;;
    venv_dir) VENV_DIR=$2 ;;
    log_file) LOG_FILE=$2 ;;
    log_worker) LOG_WORKER=$2 ;;
    *) return 1 ;;
  esac
}

script_arg() { # ARG: the subcommand
  case $1 in
    create | install | run | logs | stop | delete | all)
      [ -z "$subcommand" ] || die "two subcommands: $subcommand and $1"
      subcommand=$1
      ;;
    *) die "unexpected argument '$1' (subcommands: create install run logs stop delete all; see --help)" ;;
  esac
}

parse_args "$@"
[ -n "$subcommand" ] || die "no subcommand (create install run logs stop delete all; see --help)"

# ---------------------------------------------------------------------------------------------
# Checks, before anything runs (so that `all` does not create a TPU and then stop on a typo).

require "$TPU_NAME" "TPU name not set (--name=NAME or TPU_NAME=NAME)"
require "$ZONE" "zone not set (--zone=ZONE or ZONE=ZONE, e.g. us-central2-b)"
case $subcommand in create | all)
  require "$ACCELERATOR_TYPE" "accelerator type not set (--accelerator_type=TYPE or ACCELERATOR_TYPE=TYPE, e.g. v4-32)"
  if [ -z "$RUNTIME_VERSION" ]; then
    case $ACCELERATOR_TYPE in
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    esac
  fi
  ;;
esac
case $subcommand in install | all)
  if [ -n "$TARBALL" ] && [ -n "$REPO_URL" ]; then
    die "both --tarball and --repo_url are set; choose one"
  fi
  require "$TARBALL$REPO_URL" "no code to install: set --tarball=FILE (TARBALL) or --repo_url=URL (REPO_URL)"
  if [ -n "$TARBALL" ] && [ ! -f "$TARBALL" ]; then
    die "--tarball=$TARBALL: no such file"
  fi
  case ${REMOTE_DIR%/} in
    '' | / | . | .. | '~' | '~/' | "\$HOME") die "--remote_dir=$REMOTE_DIR would replace a whole directory tree; name a folder of its own" ;;
  esac
  ;;
esac
case $subcommand in run | all)
  require "$CONFIG" "config not set (--config=FILE.py:VARIANT or CONFIG=...)"
  require "$WORKDIR" "workdir not set (--workdir=gs://BUCKET/PATH or WORKDIR=...)"
  ;;
*)
  [ ${#trainer_args[@]} -eq 0 ] || die "trainer flags (${trainer_args[0]} ...) only go with run or all"
  ;;
esac
case $LOG_WORKER in
  all) ;;
  *) require_int "--log_worker" "$LOG_WORKER" ;;
esac

if ! is_dry_run && ! command -v "$GCLOUD" >/dev/null 2>&1; then
  die "$GCLOUD not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or pass --dry-run to print the commands"
fi

# ---------------------------------------------------------------------------------------------
# Commands

# gcloud VERB ARGS...: gcloud compute tpus tpu-vm VERB ARGS... --zone --project
tpu() {
  local verb=$1
  shift
  local cmd=("$GCLOUD" compute tpus tpu-vm "$verb" "$@" "--zone=$ZONE")
  [ -z "$PROJECT" ] || cmd+=("--project=$PROJECT")
  run "${cmd[@]}"
}

# on_workers WORKER SCRIPT: run the shell SCRIPT on WORKER (a number or all) over gcloud ssh.
on_workers() {
  tpu ssh "$TPU_NAME" "--worker=$1" ${ssh_flags[@]+"${ssh_flags[@]}"} "--command=$2"
}

# rpath PATH: a worker path as shell text; relative paths are taken from the home directory.
rpath() {
  case $1 in
    /*) q "$1" ;;
    '~/'*) printf '"$HOME"/%s' "$(q "${1#\~/}")" ;;
    *) printf '"$HOME"/%s' "$(q "$1")" ;;
  esac
}

# Shell variables that every worker script starts with.
worker_vars() {
  printf 'd=%s; venv=%s; log=%s; pid="$log.pid"; ex="$log.exit"; ' \
    "$(rpath "$REMOTE_DIR")" "$(rpath "$VENV_DIR")" "$(rpath "$LOG_FILE")"
}

running_test='[ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null'

do_create() {
  tpu create "$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
    ${create_flags[@]+"${create_flags[@]}"}
}

do_install() {
  local s tarball_remote=codi-jax-src.tar.gz
  s="set -e; $(worker_vars)"
  if [ -n "$TARBALL" ]; then
    tpu scp "$TARBALL" "$TPU_NAME:$tarball_remote" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"}
    # Unpack next to the old copy, then swap; a tarball with one top folder (GitHub's) is unwrapped.
    s+="t=$(rpath "$tarball_remote"); rm -rf \"\$d.new\"; mkdir -p \"\$d.new\"; tar -xf \"\$t\" -C \"\$d.new\"; "
    s+='src="$d.new"; if [ ! -e "$src/setup.cfg" ] && [ "$(ls -A "$src" | wc -l)" -eq 1 ]; then src="$src/$(ls -A "$src")"; fi; '
    s+='rm -rf "$d"; mv "$src" "$d"; rm -rf "$d.new" "$t"; '
  else
    s+="if [ -d \"\$d/.git\" ]; then git -C \"\$d\" fetch --quiet origin; else git clone --quiet $(q "$REPO_URL") \"\$d\"; fi; "
    if [ -n "$REPO_REF" ]; then
      s+="git -C \"\$d\" fetch --quiet origin $(q "$REPO_REF"); git -C \"\$d\" checkout --quiet --detach FETCH_HEAD; "
    else
      s+='git -C "$d" checkout --quiet --detach origin/HEAD; '
    fi
  fi
  # The TPU images ship Python 3.10; the trainer wants >= 3.11, so uv fetches one.
  s+='export PATH="$HOME/.local/bin:$PATH"; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; '
  s+="[ -x \"\$venv/bin/python\" ] || uv venv --quiet --python $(q "$PYTHON_VERSION") \"\$venv\"; "
  s+="uv pip install --quiet --python \"\$venv/bin/python\" -e \"\$d\" $(q "$JAX_SPEC"); "
  s+='"$venv/bin/python" -c "import jax, codi_jax; print(\"$(hostname): jax\", jax.__version__)"'
  on_workers all "$s"
}

do_run() {
  local s trainer
  trainer=$(qjoin env PYTHONUNBUFFERED=1 ${run_env[@]+"${run_env[@]}"})
  trainer+=' "$venv/bin/python" '
  trainer+=$(qjoin -m codi_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --multihost \
    ${trainer_args[@]+"${trainer_args[@]}"})
  s="set -e; $(worker_vars)"
  s+="if $running_test; then echo \"error: codi-jax still runs on \$(hostname) (pid \$(cat \"\$pid\")); stop it first: launch/tpu_pod.sh stop\" >&2; exit 1; fi; "
  s+='cd "$d"; rm -f "$ex"; echo "=== $(date -u "+%F %T") launch/tpu_pod.sh run" >> "$log"; '
  # setsid: the run gets its own process group, which `stop` signals; the exit status lands in $ex.
  s+="setsid nohup bash -c 'ex=\$1; shift; \"\$@\"; echo \$? > \"\$ex\"' run \"\$ex\" $trainer >> \"\$log\" 2>&1 < /dev/null & "
  s+='echo $! > "$pid"; echo "$(hostname): started pid $!, log $log"'
  on_workers all "$s"
}

do_logs() {
  local s
  s="$(worker_vars)"
  s+='if [ -f "$pid" ]; then tail --pid="$(cat "$pid")" -n +1 -F "$log"; else tail -n +1 -F "$log"; fi; '
  s+='if [ -f "$ex" ]; then exit "$(cat "$ex")"; fi; echo "$(hostname): the run left no exit status (stopped?)" >&2; exit 1'
  on_workers "$LOG_WORKER" "$s"
}

do_stop() {
  local s
  s="$(worker_vars)"
  s+="if $running_test; then kill -TERM -- -\"\$(cat \"\$pid\")\"; echo \"\$(hostname): stopped\"; else echo \"\$(hostname): not running\"; fi"
  on_workers all "$s"
}

do_delete() {
  tpu delete "$TPU_NAME" --quiet
}

case $subcommand in
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  all)
    do_create
    do_install
    do_run
    do_logs
    if [ "$DELETE_WHEN_DONE" = 1 ]; then
      do_delete
    else
      note "when done: $(qjoin "$0" delete "--name=$TPU_NAME" "--zone=$ZONE" ${PROJECT:+"--project=$PROJECT"})"
    fi
    ;;
esac
