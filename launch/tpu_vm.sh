#!/usr/bin/env bash
# jaxformer on a Cloud TPU VM slice (v4, v5e, v5p, v6e ...): the same command on every
# worker of the slice through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_vm.sh --setup NAME ZONE                  copy this checkout, install jax[tpu]
#   launch/tpu_vm.sh NAME ZONE CONFIG [--config.KEY=VALUE ...]     train
#
#   --project P   the Google Cloud project (default: gcloud's configured one)
#   --dir D       where the checkout lives on the workers (default: jaxformer, under ~)
#
# Example:
#   launch/tpu_vm.sh --setup my-v5p-32 us-east5-a
#   launch/tpu_vm.sh my-v5p-32 us-east5-a configs/gpt2_355m.py \
#       --config.train.run_dir=/mnt/shared/runs/gpt2_355m --config.mesh.fsdp=-1 --config.mesh.data=1
#
# JAX reads the coordinator, process count and ids from the TPU VM's metadata, so the
# workers need no addresses: distributed.initialize=always asks for that detection. One
# slice is one ICI domain, so its mesh needs no DCN sizes. train.run_dir must be a
# directory every worker mounts (Filestore/NFS, or a bucket through gcsfuse): checkpoints
# are written by all workers. The job runs in the foreground; for long runs start this
# script inside tmux or screen on the machine you launch from. See docs/launch.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: launch/tpu_vm.sh [--project P] [--dir D] (--setup NAME ZONE | NAME ZONE CONFIG [--config.KEY=VALUE ...])"
setup=0
project_args=()
remote_dir=jaxformer
while [ $# -gt 0 ]; do
  case "$1" in
    --setup) setup=1; shift ;;
    --project) project_args=(--project "${2:?$usage}"); shift 2 ;;
    --project=*) project_args=(--project "${1#*=}"); shift ;;
    --dir) remote_dir=${2:?$usage}; shift 2 ;;
    --dir=*) remote_dir=${1#*=}; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --*) echo "launch/tpu_vm.sh: unknown option $1" >&2; echo "$usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
name=${1:?$usage}
zone=${2:?$usage}
shift 2

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" ${project_args[@]+"${project_args[@]}"} --worker=all \
    --command "$1"
}

if [ "$setup" = 1 ]; then
  # The working tree as it is (uncommitted edits included), without runs or environments.
  archive=$(mktemp -t jaxformer-XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT
  tar --exclude=./.git --exclude=./.venv --exclude=./runs -czf "$archive" .
  gcloud compute tpus tpu-vm scp "$archive" "$name:jaxformer.tar.gz" --zone "$zone" \
    ${project_args[@]+"${project_args[@]}"} --worker=all
  on_all_workers "set -e; mkdir -p $(printf '%q' "$remote_dir") && cd $(printf '%q' "$remote_dir") \
    && tar -xzf ~/jaxformer.tar.gz && python3 -m venv .venv && . .venv/bin/activate \
    && pip install -q -U pip && pip install -q -e . 'jax[tpu]==0.10.2'"
  exit 0
fi

config=${1:?$usage}
shift
# Quote every argument for the remote shell, so overrides with spaces survive ssh.
train=$(printf '%q ' jaxformer train --config="$config" --config.distributed.initialize=always "$@")
on_all_workers "cd $(printf '%q' "$remote_dir") && . .venv/bin/activate && $train"
