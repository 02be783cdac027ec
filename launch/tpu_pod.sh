#!/usr/bin/env bash
# Run `flare train` on every worker of a Cloud TPU VM pod slice (one process per host; JAX
# detects the coordinator, process count and id on TPU VMs by itself).
#   bash launch/tpu_pod.sh TPU_NAME ZONE [--project P] -- --config configs/qwen3_5_9b.py \
#       --config.workdir=gs://bucket/runs/9b --config.data.paths="('/data/*.jsonl',)"
# The repository must be checked out (and installed) at the same path on every worker
# (FLARE_REPO, default: ~/flare-jax); the workdir must be shared (a gs:// bucket or NFS).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash launch/tpu_pod.sh TPU_NAME ZONE [gcloud flags] -- <flare train args>" >&2
  exit 2
fi
tpu="$1" zone="$2"
shift 2
gcloud_flags=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do gcloud_flags+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
repo="${FLARE_REPO:-~/flare-jax}"
remote="cd $repo && flare train --distributed $(printf '%q ' "$@")"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all "${gcloud_flags[@]}" \
  --command="$remote"
