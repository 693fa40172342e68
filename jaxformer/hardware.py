"""The machine: peak FLOP/s of the devices MFU is measured against, and the host
allocator settings that keep XLA:CPU's buffers from being page-faulted in every step."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import time

import jax
import jax.numpy as jnp

# Dense bf16 datasheet peaks per chip, TFLOP/s, keyed by a substring of device_kind.
DATASHEET_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def datasheet_peak(device: jax.Device) -> float | None:
    """Datasheet bf16 FLOP/s for a known accelerator, else None."""
    kind = device.device_kind
    for name, tflops in DATASHEET_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


@functools.cache
def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` jitted size^3 matmuls on the default device.

    CPUs have no datasheet figure that XLA can reach, so their "peak" is what XLA itself
    achieves on a large matrix product: MFU on CPU then reads as a fraction of that.
    """
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """Per-device peak FLOP/s and where the figure comes from."""
    device = jax.devices()[0]
    peak = datasheet_peak(device)
    if peak is not None:
        return peak, f"{device.device_kind} datasheet bf16"
    return measured_matmul_peak(dtype), f"measured 2048^3 {dtype} matmul on {device.platform}"


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    XLA:CPU allocates each step's buffers (hundreds of MiB to GiB) afresh. By default glibc
    serves blocks over 32 MiB with ``mmap`` and unmaps them on free, and trims its heaps,
    so the kernel zero-fills every page of them again in the next step: on the 2-core
    development machine a 100M-parameter model spent ~2.4 million page faults and ~4 s of
    system time per step (docs/performance.md). One arena, no ``mmap`` and no trimming
    make the second step reuse the first step's pages. The process keeps its peak heap,
    which the next step needs anyway. Call before the first large allocation (the CLI and
    tools/benchmark.py do); ``JAXFORMER_KEEP_HOST_MEMORY=0`` turns it off. Returns whether
    it was applied (glibc on Linux only).
    """
    if os.environ.get("JAXFORMER_KEEP_HOST_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # mallopt takes an int; glibc stores the trim threshold as size_t, so -1 is "never".
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not applied:
        logging.warning("mallopt refused the host-memory settings; buffers may page-fault")
    return applied
