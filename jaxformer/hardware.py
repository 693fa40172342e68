"""Peak FLOP/s of the devices MFU is measured against."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

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


def matmul_sampler(dtype: str = "float32", size: int = 2048) -> Callable[[], float]:
    """A compiled size^3 matmul on the default device; each call times one product and
    returns its FLOP/s. Lets a benchmark sample the peak between its timed steps."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x).lower(a).compile()
    matmul(a).block_until_ready()

    def sample() -> float:
        start = time.perf_counter()
        matmul(a).block_until_ready()
        return 2 * size**3 / (time.perf_counter() - start)

    return sample


@functools.cache
def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` jitted size^3 matmuls on the default device.

    CPUs have no datasheet figure that XLA can reach, so their "peak" is what XLA itself
    achieves on a large matrix product: MFU on CPU then reads as a fraction of that.
    """
    sample = matmul_sampler(dtype, size)
    return max(sample() for _ in range(repeats))


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """Per-device peak FLOP/s and where the figure comes from."""
    device = jax.devices()[0]
    peak = datasheet_peak(device)
    if peak is not None:
        return peak, f"{device.device_kind} datasheet bf16"
    return measured_matmul_peak(dtype), f"measured 2048^3 {dtype} matmul on {device.platform}"
