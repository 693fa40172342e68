#!/usr/bin/env bash
# Start a jaxformer job on this machine.
#
#   launch/local.sh configs/default.py [--config.KEY=VALUE ...]
#
# Uses the virtual environment in .venv when there is one. Multi-process launches on
# 127.0.0.1 (and SLURM, TPU VM and Kubernetes templates) arrive with multi-host support.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG [--config.KEY=VALUE ...]}
shift
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
exec jaxformer train --config="$config" "$@"
