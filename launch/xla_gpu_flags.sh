# XLA flags for multi-GPU training, collected in one place (docs/performance.md).
# Source it before starting jaxformer on GPUs:  . launch/xla_gpu_flags.sh
# launch/slurm.sbatch and launch/local.sh --gpus_per_process source it themselves.
#
# - latency hiding scheduler: overlap collectives (FSDP all-gathers, gradient
#   reduce-scatters) with compute instead of running them in between;
# - combine thresholds: merge many small per-layer collectives into fewer large ones;
# - pipelined all-gather / reduce-scatter / all-reduce: issue a scanned layer's
#   collectives one iteration ahead, so they overlap the previous layer's compute;
# - while-loop double buffering: the same for loops (the layer scan) XLA unrolls by two.
# These are the flags the JAX GPU performance guides and MaxText's GPU configs use; their
# names are checked against the installed jaxlib by tests/test_launch_flags.py, but their
# speed-up has not been measured on this project's machines (no multi-GPU host).
# Flags already in XLA_FLAGS (e.g. simulated CPU devices) are kept.
JAXFORMER_XLA_GPU_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_pipelined_all_reduce=true \
--xla_gpu_enable_while_loop_double_buffering=true"
export XLA_FLAGS="${XLA_FLAGS:-} $JAXFORMER_XLA_GPU_FLAGS"
