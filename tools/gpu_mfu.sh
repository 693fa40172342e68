#!/usr/bin/env bash
# The performance issue's GPU measurements in one run (docs/performance.md, "MFU on one
# H100"): cuDNN attention checked against the einsum path, then MFU in bf16 of the
# ~1B LLaMA-style model (llama_1b), unrolled and scanned, and GPT-2 124M.
#
#     bash tools/gpu_mfu.sh OUT_DIR      # rows go to OUT_DIR/BENCHMARKS.md (a copy)
#
# Where the tree is copied to the GPU machine without its git history, name the commit:
# JAXFORMER_COMMIT=$(git rev-parse --short HEAD) (tools/benchmark.py writes it in the rows).
#
# Made for a lent H100/H200 with jax, flax and optax installed but no network: jaxformer
# runs from the checkout (PYTHONPATH), ml_collections from a wheel if one is in .whl/.
set -uo pipefail
out=$(realpath "${1:-.}")
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The benchmark runs each config in its own process; let it use the whole card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
[ "$out/BENCHMARKS.md" -ef BENCHMARKS.md ] || cp BENCHMARKS.md "$out/BENCHMARKS.md"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"

if [ "${GPU_TESTS:-1}" = 1 ]; then  # GPU_TESTS=0 skips them when device time is short
    JAXFORMER_TEST_PLATFORMS=cuda timeout 90 python3 -m pytest -q -n 0 -p no:cacheprovider \
        tests/test_attention.py -k "cudnn or dots_attention" 2>&1 | tail -n 15
fi

bench() {  # timeout stops the parent only: end its per-config child too
    timeout "$1" python3 tools/benchmark.py "${@:2}" --write --output="$out/BENCHMARKS.md"
    pkill -f tools/benchmark.py
}
# llama_1b as configured (unrolled layers, remat=dots_attention) against scanned layers.
# Unrolled, the config took about 4 minutes of wall time at 185c058 (step compile 37 s).
bench 300 --steps=6 --warmup=2 \
    --config=configs/llama_1b.py --config.train.global_batch=16 --config.train.microbatches=1 \
    --config=configs/llama_1b.py --config.train.global_batch=16 --config.train.microbatches=1 \
    --config.model.scan_layers=True
# GPT-2 124M with attention_impl=auto (cuDNN) and the tied head's backward in bf16.
bench 60 --steps=8 --warmup=2 \
    --config=configs/gpt2_124m.py --config.train.global_batch=64 --config.train.microbatches=1
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv
