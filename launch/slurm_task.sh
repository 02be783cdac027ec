#!/usr/bin/env bash
# One SLURM task of a multi-node `flare train` job (started by `srun` from launch/slurm.sbatch):
# the jax.distributed settings from the SLURM environment, then `flare train --distributed ARGS`.
#   FLARE_PROCESS_MODE=gpu   one process per GPU (srun --ntasks-per-node=<GPUs per node>)
#   FLARE_PROCESS_MODE=node  one process per node driving all its GPUs (--ntasks-per-node=1)
# Override the command with FLARE_TRAIN_CMD (default: "flare train --distributed").
set -euo pipefail
: "${SLURM_JOB_ID:?run under srun}" "${SLURM_NTASKS:?}" "${SLURM_PROCID:?}" "${SLURM_LOCALID:?}"
nodes="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:?}}"
mapfile -t hosts < <(scontrol show hostnames "$nodes")
first_node="${hosts[0]:?scontrol expanded no host from $nodes}"
port="${FLARE_COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}"
export JAX_COORDINATOR_ADDRESS="$first_node:$port"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export JAX_PROCESS_ID="$SLURM_PROCID"
case "${FLARE_PROCESS_MODE:-gpu}" in
  gpu)  # one GPU per task: SLURM_LOCALID of the node's GPUs, or the only one SLURM bound
    if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+$ ]]; then export JAX_LOCAL_DEVICE_IDS=0
    else export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; fi ;;
  node) unset JAX_LOCAL_DEVICE_IDS ;;                     # every GPU of the node
  *) echo "slurm_task.sh: FLARE_PROCESS_MODE must be gpu or node" >&2; exit 2 ;;
esac
read -r -a train_cmd <<< "${FLARE_TRAIN_CMD:-flare train --distributed}"
exec "${train_cmd[@]}" "$@"
