"""RMSNorm, SwiGLU and rotary embedding with hand-derived backward functions.

Each op is a pair of pure functions (forward, backward) wrapped in an autograd
function that saves only the op's inputs (and RMSNorm's per-row 1/rms). On CUDA the
pure functions are compiled by `torch.compile` into one fused kernel each; on the CPU
they run as written, which is what the tests check against autograd.

RMSNorm (y = w * x / rms(x), rms(x) = sqrt(mean(x^2) + eps), per row; n = x / rms):
    dx = (1 / rms) * (dy*w - n * mean(dy*w * n)),     dw = sum over rows of dy * n

SwiGLU (h = silu(g) * u, silu(g) = g * sigmoid(g)):
    dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),     du = dh * silu(g)

Rotary embedding (y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)):
the map is a rotation of each (x1[j], x2[j]) pair by angle theta_j, so its transpose is
the rotation by -theta_j:  dx = dy * cos + rotate_half(dy) * (-sin).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

_compile_on_cuda = True


def set_compile(enabled: bool) -> None:
    """Turn `torch.compile` of the fused pieces on or off (on by default on CUDA)."""
    global _compile_on_cuda
    _compile_on_cuda = enabled


class _CompiledOnCuda:
    """Run `fn` compiled when its first argument lives on a CUDA device, as written otherwise.

    Each instance compiles its own copy of `fn` (a new code object): torch.compile keeps
    its caches and its guesses about which sizes vary per code object, so one call site
    (say RoPE on K, 8 heads) cannot turn another (RoPE on Q, 32 heads) into a slower
    dynamic-shape kernel.
    """

    def __init__(self, fn: Callable, role: str = "") -> None:
        self.fn = fn
        self.role = role
        self.compiled: Callable | None = None

    def __call__(self, *args):
        if _compile_on_cuda and args[0].is_cuda:
            if self.compiled is None:
                name = f"{self.fn.__name__}_{self.role}" if self.role else self.fn.__name__
                code = self.fn.__code__.replace(co_name=name)
                own = types.FunctionType(
                    code, self.fn.__globals__, name, self.fn.__defaults__, self.fn.__closure__
                )
                self.compiled = torch.compile(own, dynamic=None)
            return self.compiled(*args)
        return self.fn(*args)


_KERNELS: dict[tuple[Callable, str], _CompiledOnCuda] = {}


def kernel(fn: Callable, role: str = "") -> _CompiledOnCuda:
    """The compiled-on-CUDA version of `fn` for one call site (`role`)."""
    found = _KERNELS.get((fn, role))
    if found is None:
        found = _KERNELS[(fn, role)] = _CompiledOnCuda(fn, role)
    return found


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, so the CPU tests can check to 1e-10)."""
    return t.float() if t.element_size() < 4 else t


# RMSNorm -----------------------------------------------------------------------------


def _rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = _up(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (T, 1)
    # transformers' order of operations: normalise in fp32, cast, then scale in x's dtype
    return weight * (xf * rstd).to(x.dtype), rstd


def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n = _up(x) * rstd
    dyw = _up(dy) * _up(weight)
    dx = rstd * (dyw - n * (dyw * n).mean(-1, keepdim=True))
    dw = (_up(dy) * n).reshape(-1, n.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, role: str) -> torch.Tensor:
        y, rstd = kernel(_rms_norm_fwd, role)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.role = role
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = kernel(_rms_norm_bwd, ctx.role)(dy, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, role: str = "") -> torch.Tensor:
    """RMSNorm over the last dimension, as transformers' Llama computes it.

    `role` names the call site, so each site gets its own compiled kernel on CUDA.
    """
    return _RMSNorm.apply(x, weight, eps, role)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_fwd(x, weight, eps)[0]


# SwiGLU ------------------------------------------------------------------------------


def _swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def _swiglu_bwd(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    gf = _up(g)
    sig = torch.sigmoid(gf)
    dhf = _up(dh)
    dg = dhf * _up(u) * sig * (1 + gf * (1 - sig))
    du = dhf * _up((gf * sig).to(g.dtype))
    return dg.to(g.dtype), du.to(u.dtype)


_swiglu_fwd_k = kernel(_swiglu_fwd)
_swiglu_bwd_k = kernel(_swiglu_bwd)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return _swiglu_fwd_k(g, u)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        return _swiglu_bwd_k(dh, g, u)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u."""
    return _SwiGLU.apply(g, u)


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _swiglu_fwd(g, u)


# Rotary embedding --------------------------------------------------------------------


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, S, H, D); cos, sin: (B or 1, S, D) -> broadcast over heads
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rope_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rope(dy, cos, -sin)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, role: str
    ) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.role = role
        return kernel(_rope, role)(x, cos, sin)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return kernel(_rope_bwd, ctx.role)(dy, cos, sin), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, role: str = "") -> torch.Tensor:
    """Rotary embedding of x (B, S, H, D) with cos, sin (B or 1, S, D) (transformers' convention).

    `role` names the call site (q, k), so each gets its own compiled kernel on CUDA.
    """
    return _Rope.apply(x, cos, sin, role)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rope(x, cos, sin)
