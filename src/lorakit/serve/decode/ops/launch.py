"""What the decoding step's Triton kernels share when they launch: where they may run, the
GPU's size, and whether they launch as programmatic dependents."""

from __future__ import annotations

import functools

import torch

from lorakit.serve.decode.tuning import active


def triton_device(device: torch.device) -> torch.device | None:
    """`device` with its index when Triton kernels may run there (CUDA, Triton installed)."""
    if device.type != "cuda":
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # Triton's interpreter on the CPU: any split works
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def hopper(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 9 or more (Hopper's copy engine and
    warpgroup products, programmatic dependent launch); asked once per device."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Whether a decoding step's kernels launch as programmatic dependents on `device`: the
    active tuning's `pdl` and `hopper`."""
    return active().pdl and hopper(device)
