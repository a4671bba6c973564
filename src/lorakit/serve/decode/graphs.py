"""Capturing a step of the fast decode path as a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(run: Callable[[], T], device: torch.device, pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """`run` captured as a CUDA graph in memory pool `pool` (None: a new one); returns the
    graph and what the captured call returned (its outputs, rewritten by every replay).

    `run` first runs twice on a side stream, as CUDA graphs require (cuBLAS handles, lazy
    initialisation, compiling happen there, not in the capture); the caller makes those
    runs harmless (they write what the replay will write, or where nothing reads)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out
