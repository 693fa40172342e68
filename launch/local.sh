#!/usr/bin/env bash
# Start a jaxformer job on this machine: one process, or N processes on 127.0.0.1.
#
#   launch/local.sh [OPTIONS] CONFIG [--config.KEY=VALUE ...]
#
#   --processes N         start N processes joined by jax.distributed (default 1); process 0
#                         runs the coordinator on 127.0.0.1:PORT and alone writes the logs
#   --port P              the coordinator port (default: a free one)
#   --cpu_devices K       run on the CPU with K simulated devices per process
#   --gpus_per_process K  give process i GPUs i*K .. i*K+K-1 (one GPU machine, N processes)
#
# Examples:
#   launch/local.sh configs/default.py
#   launch/local.sh --processes 2 --cpu_devices 4 configs/default.py --config.mesh.dcn_data=2
#
# Several processes on one machine exercise exactly the multi-host code paths (per-host
# data, cross-process collectives over gloo on CPU, checkpoints written by every process).
# Uses the virtual environment in .venv when there is one. If any process fails, the
# others are stopped and its exit status is returned. See docs/launch.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: launch/local.sh [--processes N] [--port P] [--cpu_devices K] [--gpus_per_process K] CONFIG [--config.KEY=VALUE ...]"
processes=1
port=""
cpu_devices=""
gpus_per_process=""
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) processes=${2:?$usage}; shift 2 ;;
    --processes=*) processes=${1#*=}; shift ;;
    --port) port=${2:?$usage}; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --cpu_devices) cpu_devices=${2:?$usage}; shift 2 ;;
    --cpu_devices=*) cpu_devices=${1#*=}; shift ;;
    --gpus_per_process) gpus_per_process=${2:?$usage}; shift 2 ;;
    --gpus_per_process=*) gpus_per_process=${1#*=}; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --*) echo "launch/local.sh: unknown option $1" >&2; echo "$usage" >&2; exit 2 ;;
    *) break ;;
  esac
done
config=${1:?$usage}
shift
for value in "$processes" ${cpu_devices:+"$cpu_devices"} ${gpus_per_process:+"$gpus_per_process"}; do
  case "$value" in
    ''|*[!0-9]*|0) echo "launch/local.sh: counts must be positive integers, got '$value'" >&2; exit 2 ;;
  esac
done

# shellcheck source=/dev/null
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
if [ -n "$cpu_devices" ]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$cpu_devices"
fi

if [ -n "$gpus_per_process" ]; then
  # shellcheck source=launch/xla_gpu_flags.sh
  . launch/xla_gpu_flags.sh
fi
if [ "$processes" -eq 1 ] && [ -z "$gpus_per_process" ]; then
  exec jaxformer train --config="$config" "$@"
fi

if [ -z "$port" ]; then
  port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$processes"

pids=()
stop_all() {
  for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
}
# SIGTERM (a scheduler's preemption notice) is passed on: every process saves a checkpoint
# at the same step and exits with 75, which this script then returns.
trap 'stop_all; exit 130' INT
trap 'stop_all' TERM

for ((i = 0; i < processes; i++)); do
  if [ -n "$gpus_per_process" ]; then
    first=$((i * gpus_per_process))
    ids=$(seq -s, "$first" $((first + gpus_per_process - 1)))
    JAX_PROCESS_ID=$i JAX_LOCAL_DEVICE_IDS=$ids jaxformer train --config="$config" "$@" &
  else
    JAX_PROCESS_ID=$i jaxformer train --config="$config" "$@" &
  fi
  pids+=("$!")
done

# The first process to fail stops the rest: a lone survivor would wait in a collective.
# (Polling rather than `wait -n`, which macOS's bash 3.2 lacks.)
running=("${pids[@]}")
preempted=0
while [ ${#running[@]} -gt 0 ]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    status=0
    wait "$pid" || status=$?
    if [ "$status" -eq 75 ]; then preempted=1; continue; fi  # the others are saving too
    if [ "$status" -ne 0 ]; then
      echo "launch/local.sh: process $pid exited with status $status; stopping the others" >&2
      stop_all
      wait || true
      exit "$status"
    fi
  done
  running=(${still[@]+"${still[@]}"})
  if [ ${#running[@]} -gt 0 ]; then sleep 1; fi
done
if [ "$preempted" -eq 1 ]; then exit 75; fi
