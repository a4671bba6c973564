"""Linear + cross-entropy in chunks of rows: the full (tokens, vocab) logits never exist.

For rows h (N, d) with targets t, head W (V, d) and mean over the N rows:

    z = h @ W.T                       (one chunk of rows at a time, fp32 softmax)
    loss = mean_i (logsumexp(z_i) - z_i[t_i])
    dz_i = (softmax(z_i) - onehot(t_i)) / N
    dh = dz @ W,   dW = dz.T @ h      (dW only when the head is trained)

The gradients are formed in the forward, chunk by chunk, while each chunk's logits are
at hand (the loss is a scalar, so the backward only scales them by the incoming
gradient). Peak extra memory is one chunk of logits instead of N x V.
Only supervised rows are passed in: the caller drops positions whose label is ignored.

`linear_token_logps` is the same computation per row: log p(t_i | h_i) for each row, for
objectives that score whole sequences (DPO, ORPO). Its backward scales each row's stored
gradient by that row's incoming gradient, so the head must be frozen (a LoRA run's is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.train.fastpath.elementwise import _up, kernel


def _ce_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss (C,) at least fp32 and its gradient d(loss_i)/d(logits_i), in logits' dtype."""
    z = _up(logits)
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, target.unsqueeze(1)).squeeze(1)
    grad = torch.softmax(z, dim=-1)
    grad = grad.scatter_add(1, target.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
    return lse - picked, grad.to(logits.dtype)


def _ce_chunk(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of a chunk and its gradient d(sum)/d(logits), in logits' dtype."""
    losses, grad = _ce_rows(logits, target)
    return losses.sum(), grad


def default_chunk_rows(vocab: int) -> int:
    # about 256 MiB of fp32 logits per chunk, at least 256 rows
    return max(256, (1 << 26) // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(h.dtype) if weight.dtype != h.dtype else weight
        dh = torch.empty_like(h) if need_h else None  # no gradient work under no_grad (evaluation)
        dw = torch.zeros(weight.shape, dtype=_up(h).dtype, device=h.device) if need_w else None
        total = torch.zeros((), dtype=_up(h).dtype, device=h.device)
        for start in range(0, n, chunk):
            hc = h[start : start + chunk]
            logits = hc @ w.t()  # (C, V)
            # the 1/n of the mean is applied in the backward, so the compiled kernel sees no per-batch constant
            role = "full" if logits.shape[0] == chunk else "tail"  # the last chunk is shorter
            loss, dz = kernel(_ce_chunk, role)(logits, target[start : start + chunk])
            del logits
            total += loss
            if dh is not None:
                torch.mm(dz, w, out=dh[start : start + chunk])
            if dw is not None:
                dw.add_(_up(dz.t() @ hc))
        empty = torch.empty(0)
        ctx.save_for_backward(dh if dh is not None else empty, dw if dw is not None else empty)
        ctx.need_h = need_h
        ctx.need_w = need_w
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        scale = grad / ctx.n
        gh = dh * scale.to(dh.dtype) if ctx.need_h else None
        gw = (dw * scale).to(ctx.weight_dtype) if ctx.need_w else None
        return gh, gw, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ weight.T) against target; h: (N, d), target: (N,)."""
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()) * 0.0
    return _LinearCrossEntropy.apply(
        h, weight, target, chunk or default_chunk_rows(weight.shape[0])
    )


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int) -> torch.Tensor:
        n = h.shape[0]
        w = weight.to(h.dtype) if weight.dtype != h.dtype else weight
        need_h = ctx.needs_input_grad[0]
        dh = torch.empty_like(h) if need_h else None  # d(loss_i)/d(h_i), row by row
        out = torch.empty(n, dtype=_up(h).dtype, device=h.device)
        for start in range(0, n, chunk):
            logits = h[start : start + chunk] @ w.t()
            role = "full" if logits.shape[0] == chunk else "tail"
            losses, dz = kernel(_ce_rows, role)(logits, target[start : start + chunk])
            del logits
            out[start : start + chunk] = -losses
            if dh is not None:
                torch.mm(dz, w, out=dh[start : start + chunk])
        ctx.save_for_backward(dh if dh is not None else torch.empty(0))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dh,) = ctx.saved_tensors
        return -dh * grad.unsqueeze(1).to(dh.dtype), None, None, None


def linear_token_logps(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """log softmax(h @ weight.T)[i, target_i] for each row, (N,) at least fp32; h: (N, d).
    The head `weight` is frozen here: a head that requires grad is refused."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_token_logps runs with a frozen output head (this one requires grad)")
    return _LinearTokenLogps.apply(h, weight, target, chunk or default_chunk_rows(weight.shape[0]))


def linear_token_logps_reference(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(_up(h @ weight.to(h.dtype).t()), target, reduction="none")


def linear_cross_entropy_reference(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(_up(h @ weight.to(h.dtype).t()), target)
