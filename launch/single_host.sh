#!/usr/bin/env bash
# Run a codi-jax job on one host (CPU box, GPU box, Colab, a single TPU VM), resuming if WORKDIR
# already holds checkpoints. Usage:
#   launch/single_host.sh CONFIG WORKDIR [--config.a.b=value ...]
#   launch/single_host.sh configs/sr.py:tiny runs/sr_tiny --config.codi.mode=pe
# Several hosts: launch/tpu_pod.sh (TPU VM pods), launch/multi_gpu.sh (GPU hosts); docs/launch.md.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.a.b=value ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
# Let XLA take what it needs instead of pre-allocating 75% of accelerator memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
mkdir -p "$workdir"
python -m codi_jax.main --config="$config" --workdir="$workdir" "$@" 2>&1 | tee -a "$workdir/log.txt"
