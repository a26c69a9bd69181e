"""Tensor memory: counted while code runs, and estimated by running it on fake tensors.

The CPU has no allocator statistics (`torch.cuda.max_memory_allocated` has no CPU
twin), so `TensorMemory` counts what such statistics would: the bytes of every tensor
storage created by an operation while it is active, alive until the storage is freed,
and their peak. Run under torch's `FakeTensorMode` (tensors with shapes and dtypes and
no data), the same code measures what a step would need without allocating it:
`rlhf plan` runs a model's forward and backward that way (rlhf/plan.py), and the
benchmarks measure real steps with the same counter (benchmarks/plan_vs_measured.py).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storage alive (`current`) and their maximum (`peak`), counting the
    storages that operations create while this mode is active (on `device_type`).
    Tensors that existed before are not counted; views share their storage's count.

        with TensorMemory() as mem:
            step()
        mem.peak
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not (isinstance(t, torch.Tensor) and t.device.type == self.device_type and t.layout == torch.strided):
                continue
            storage = t.untyped_storage()
            if storage._cdata in self._live:
                continue
            if inputs is None:  # a view of an input (or the input itself) is nothing new
                inputs = {x.untyped_storage()._cdata for x in tree_flatten((args, kwargs))[0]
                          if isinstance(x, torch.Tensor) and x.layout == torch.strided}
            if storage._cdata not in inputs:
                self._count(storage)
        return out

    def _count(self, storage) -> None:
        key = storage._cdata
        self._live[key] = storage.nbytes()
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


@contextlib.contextmanager
def fake_tensors():
    """Tensors made inside have shapes, dtypes and devices but no data (torch's
    FakeTensorMode); transformers treats them as traced and skips its data-dependent
    checks. Real tensors passed in are converted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (FlashAttention-2, sdpa's flash and memory-efficient
    kernels) keeps for its backward: queries, keys, values (keys and values at their own
    head count: no repeat for grouped queries), the output, and a float32 log-sum-exp
    per head and query. No data is computed: for fake-tensor runs only."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, heads, S, d), (B, kv_heads, S, d)
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # (B, S, heads, d)
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_attention(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function with the memory of a fused kernel (see
    `_FusedAttention`); registered as `rlhf_fused_attention` for fake-tensor runs."""
    return _FusedAttention.apply(query, key, value), None


def register_fused_attention() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register("rlhf_fused_attention", fused_attention)
    AttentionMaskInterface.register("rlhf_fused_attention", flash_attention_mask)
    return "rlhf_fused_attention"
