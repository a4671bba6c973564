"""The LoRA layer of an embedding table: `nn.Embedding` with named adapters beside it
(`lora_embedding_A`, `lora_embedding_B`, PEFT's names), the embedding counterpart of
`layers.LoraLinear`, sharing its `LoraLayer` base."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.layers import LoraLayer, adapter_dtype, init_on_cpu


class LoraEmbedding(LoraLayer):
    """`nn.Embedding` with LoRA adapters: y = E[ids] + scaling * A.T[ids] @ B.T.

    A: (r, num_embeddings), zero at init; B: (embedding_dim, r), normal at init (PEFT's
    choice, so a fresh adapter is a no-op and its gradient reaches A).
    """

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        self._base_shell = [base]
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add(
        self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool
    ) -> None:
        if use_dora:
            raise ValueError(
                "use_dora is supported on linear layers only; an embedding was targeted"
            )
        dtype = adapter_dtype(self.weight.dtype)
        device = self.weight.device
        self._set_scaling(name, r, alpha, use_rslora)
        self.use_dora[name] = False
        self.lora_embedding_A[name] = nn.Parameter(
            torch.zeros(r, self.num_embeddings, device=device, dtype=dtype)
        )
        self.lora_embedding_B[name] = nn.Parameter(
            torch.empty(self.embedding_dim, r, device=device, dtype=dtype)
        )
        init_on_cpu(self.lora_embedding_B[name], nn.init.normal_)

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(
                f"adapter {name!r} is merged into the base weight; unmerge it before deleting"
            )
        for table in (self.lora_embedding_A, self.lora_embedding_B):
            if name in table:
                del table[name]
        self._forget(name)

    def delta(self, name: str) -> torch.Tensor:
        """scaling * (B @ A).T in fp32, shape (num_embeddings, embedding_dim)."""
        a = self.lora_embedding_A[name].float()
        b = self.lora_embedding_B[name].float()
        return (b @ a).t() * self.scaling[name]

    def merge(self, names: Sequence[str], safe: bool = False) -> None:
        for name in names:
            if name in self.merged_adapters or name not in self.r:
                continue
            merged = self.weight.float() + self.delta(name)
            if safe and not torch.isfinite(merged).all():
                raise ValueError(
                    f"merging adapter {name!r} would put NaN/Inf into the base weight; nothing merged"
                )
            with torch.no_grad():
                self.weight.copy_(merged.to(self.weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.weight.copy_((self.weight.float() - self.delta(name)).to(self.weight.dtype))

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids,
            table,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self._embed(ids, self.weight)
        if self.disabled:
            return result
        if self.mixed is not None:
            return self._mixed_forward(ids, result)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        out_dtype = result.dtype
        for name in pending:
            a = self.lora_embedding_A[name]
            after_a = F.embedding(
                ids,
                a.t(),
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
            result = result + (after_a @ self.lora_embedding_B[name].t()) * self.scaling[name]
        return result.to(out_dtype)

    def _mixed_forward(self, ids: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        mixed = self.mixed
        assert mixed is not None
        present = [n for n in mixed.names if n in self.r]
        if not present:
            return result
        if any(n in self.merged_adapters for n in present):
            raise ValueError(
                "an adapter of this batch is merged into the base; unmerge before running mixed batches"
            )
        r_max = max(self.r[n] for n in present)
        ref = self.lora_embedding_A[present[0]]
        count = len(mixed.names) + 1
        a_stack = ref.new_zeros(count, self.num_embeddings, r_max)  # A transposed: rows are tokens
        b_stack = ref.new_zeros(count, self.embedding_dim, r_max)
        for slot, n in enumerate(mixed.names):
            if n in self.r:
                r = self.r[n]
                a_stack[slot, :, :r] = self.lora_embedding_A[n].t()
                b_stack[slot, :, :r] = self.lora_embedding_B[n] * self.scaling[n]
        index = torch.where(mixed.row_index < 0, count - 1, mixed.row_index)  # (batch,)
        flat_ids = ids + (index * self.num_embeddings).view(-1, *([1] * (ids.dim() - 1)))
        after_a = a_stack.reshape(-1, r_max)[flat_ids]  # (batch, seq, r)
        squeeze = after_a.dim() == 2
        h = after_a.unsqueeze(1) if squeeze else after_a
        y = torch.bmm(h, b_stack[index].transpose(1, 2))
        y = y.squeeze(1) if squeeze else y
        return result + y.to(result.dtype)
