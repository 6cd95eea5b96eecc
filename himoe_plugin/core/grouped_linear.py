"""Grouped linear layer: E linear maps, each applied to its own contiguous block of rows.

Two backends compute the same function with the same autograd contract:

- ``loop``: one matmul per expert that has rows. Any device, dtype and shape.
- ``grouped_mm``: torch's grouped GEMM (``torch._grouped_mm``, public as
  ``torch.nn.functional.grouped_mm``): all experts in one call, no host loop. On CUDA
  sm90/sm100 with bfloat16 it is one CUTLASS kernel; elsewhere (CPU, other GPUs, float32,
  float16 without cuBLASLt grouped GEMM) torch runs its own per-group loop.

``auto`` (the default) uses ``grouped_mm`` where torch has the CUTLASS kernel and the shapes
qualify, and the loop everywhere else. Both backends write every expert's weight gradient
straight into one (E, out, in) tensor, zeros for experts without rows (DDP never sees an unused
parameter; indexing a stacked weight per expert would instead make autograd stack E separate
gradients). An optional ``row_index`` fuses the gather of the input rows into the first layer:
the gathered (A, in) matrix is never kept for the backward, which re-gathers what it needs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .config import GROUPED_MM_ALIGNMENT, MoEConfigError, check_expert_backend

#: torch._grouped_mm takes these dtypes (its CUDA fast path only bfloat16).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The CUTLASS grouped kernel handles fewer groups than this.
GROUPED_MM_MAX_GROUPS = 1024


def autocast_dtype(device_type: str):
    """The autocast compute dtype active for ``device_type``, or None (torch >= 2.0)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device kind
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def grouped_mm_qualifies(device_type: str, capability, dtype: torch.dtype, weight_shape: Sequence[int]) -> bool:
    """Whether ``auto`` runs these operands through torch's grouped GEMM.

    Only where it is a real grouped kernel: CUTLASS on CUDA sm90/sm100 (``capability`` is the
    device's ``(major, minor)``, None off CUDA) for bfloat16, with fewer than 1024 experts and
    layer widths (``weight_shape`` = (E, out, in)) that are multiples of 8. Elsewhere torch's
    grouped GEMM is itself a per-group loop, after copying the offsets to the host.
    """
    return (
        hasattr(torch, "_grouped_mm")
        and device_type == "cuda"
        and torch.version.hip is None
        and dtype == torch.bfloat16
        and capability is not None
        and capability[0] in (9, 10)
        and weight_shape[0] < GROUPED_MM_MAX_GROUPS
        and all(d % GROUPED_MM_ALIGNMENT == 0 for d in weight_shape[1:])
    )


def resolve_backend(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    backend_key: str = "expert_backend",
) -> str:
    """``"loop"`` or ``"grouped_mm"`` for these operands (already in their compute dtype).

    Raises ``MoEConfigError`` naming ``backend_key`` when ``grouped_mm`` is forced on a dtype
    torch's grouped GEMM does not take.
    """
    if backend == "loop":
        return "loop"
    if backend == "grouped_mm":
        if x.dtype not in GROUPED_MM_DTYPES:
            raise MoEConfigError(
                backend_key, backend,
                f"torch's grouped GEMM takes {[str(d) for d in GROUPED_MM_DTYPES]}, not {x.dtype}",
            )
        return "grouped_mm"
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    qualifies = grouped_mm_qualifies(x.device.type, capability, x.dtype, tuple(weight.shape)) and all(
        t.data_ptr() % 16 == 0 for t in (x, weight)
    )
    return "grouped_mm" if qualifies else "loop"


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    rows_per_expert: Sequence[int],
    expert_counts: Optional[torch.Tensor] = None,
    row_index: Optional[torch.Tensor] = None,
    relu: bool = False,
    backend: str = "auto",
    backend_key: str = "expert_backend",
) -> torch.Tensor:
    """``y[rows of e] = x_rows[rows of e] @ weight[e].T + bias[e]`` for every expert e, then
    ``relu(y)`` when ``relu`` (applied to each expert's block while it is in cache).

    Args:
        x: (A, in), rows grouped by expert in expert order; or, with ``row_index``, (N, in) and
            ``x_rows = x[row_index]``.
        weight: (E, out, in). bias: (E, out).
        rows_per_expert: E ints summing to A (host list).
        expert_counts: (E,) integer tensor on x's device equal to ``rows_per_expert`` (used by
            ``grouped_mm``; built from the list when omitted).
        row_index: optional (A,) long, the input row of every output row.
        relu: apply ReLU to the output.
        backend: ``"auto"``, ``"loop"`` or ``"grouped_mm"`` (see the module docstring).
        backend_key: the config key named in errors about ``backend``.
    Returns:
        (A, out). Under autocast the matmuls run in the autocast dtype, like ``F.linear``.
    """
    rows_per_expert = [int(r) for r in rows_per_expert]
    check_expert_backend(backend, key=backend_key)
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if resolve_backend(backend, x, weight, backend_key) == "grouped_mm":
            if expert_counts is None:
                expert_counts = torch.tensor(rows_per_expert, device=x.device)
            return _GroupedMMLinear.apply(
                x, weight, bias, row_index, relu, rows_per_expert, expert_counts, backend_key
            )
        return _LoopLinear.apply(x, weight, bias, row_index, relu, rows_per_expert)


def _rows_of(x: torch.Tensor, row_index: Optional[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Input rows ``start:end`` of the grouped order."""
    if row_index is None:
        return x[start:end]
    return x.index_select(0, row_index[start:end])


def _zero_idle(rows_per_expert: List[int], *grads: Optional[torch.Tensor]) -> None:
    """Zero the gradient slices of experts without rows (DDP-safe zeros)."""
    for e, rows in enumerate(rows_per_expert):
        if rows == 0:
            for grad in grads:
                if grad is not None:
                    grad[e].zero_()


def _relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gradient through ``out = relu(z)`` given ``out``."""
    return torch.ops.aten.threshold_backward(grad, out, 0)


class _LoopLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, row_index, relu: bool, rows_per_expert: List[int]):
        out = x.new_empty(sum(rows_per_expert), weight.shape[1])
        start = 0
        for e, rows in enumerate(rows_per_expert):
            if rows:
                end = start + rows
                block = out[start:end]
                torch.addmm(bias[e], _rows_of(x, row_index, start, end), weight[e].t(), out=block)
                if relu:
                    block.relu_()
                start = end
        ctx.save_for_backward(x, weight, row_index, out if relu else None)
        ctx.rows_per_expert = rows_per_expert
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, row_index, out = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        grad_x = None
        if need_x:  # gathered rows may repeat (top-k > 1) or be missing (dropped): accumulate
            grad_x = torch.empty_like(x) if row_index is None else torch.zeros_like(x)
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = weight.new_empty(weight.shape[:2]) if need_b else None
        start = 0
        for e, rows in enumerate(ctx.rows_per_expert):
            if not rows:
                continue
            end = start + rows
            g = grad_out[start:end]
            if out is not None:
                g = _relu_backward(g, out[start:end])
            if need_x:
                if row_index is None:
                    torch.mm(g, weight[e], out=grad_x[start:end])
                else:
                    grad_x.index_add_(0, row_index[start:end], torch.mm(g, weight[e]))
            if need_w:
                torch.mm(g.t(), _rows_of(x, row_index, start, end), out=grad_w[e])
            if need_b:
                torch.sum(g, dim=0, out=grad_b[e])
            start = end
        _zero_idle(ctx.rows_per_expert, grad_w, grad_b)
        return grad_x, grad_w, grad_b, None, None, None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned start (torch's grouped GEMM needs both on CUDA)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class _GroupedMMLinear(torch.autograd.Function):
    """Same contract as ``_LoopLinear`` through ``torch._grouped_mm``.

    Layouts: forward ``x (A, in) @ weight^T`` (2d x 3d); input gradient ``grad (A, out) @ weight``
    (2d x 3d); weight gradient ``grad^T (out, A) @ x (A, in)`` (2d x 2d, column-major x
    row-major). Every group then starts at a multiple of a row stride that is a multiple of 16
    bytes (layer widths are multiples of 8), so groups need no padding. The bias is added (and
    its gradient summed, in float32) outside the GEMM, which does not take one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, row_index, relu: bool, rows_per_expert: List[int], expert_counts, backend_key):
        num_rows = sum(rows_per_expert)
        num_experts = weight.shape[0]
        offsets = torch.cumsum(expert_counts, 0, dtype=torch.int32)
        row_expert = torch.repeat_interleave(
            torch.arange(num_experts, device=x.device), expert_counts, output_size=num_rows
        )
        rows = x if row_index is None else x.index_select(0, row_index)
        if num_rows == 0:
            out = x.new_empty(0, weight.shape[1])
        else:
            try:
                out = torch._grouped_mm(_aligned(rows), weight.transpose(-2, -1), offs=offsets)
            except RuntimeError as err:
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    raise
                raise MoEConfigError(
                    backend_key, "grouped_mm",
                    f"torch's grouped GEMM cannot run on {x.device} with {x.dtype} inputs of shapes "
                    f"{tuple(rows.shape)} x {tuple(weight.shape)}: {err}",
                ) from err
            out.add_(bias.index_select(0, row_expert))
            if relu:
                out.relu_()
        ctx.save_for_backward(x, weight, row_index, offsets, row_expert, out if relu else None)
        ctx.rows_per_expert = rows_per_expert
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, row_index, offsets, row_expert, out = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out.shape[0] == 0:  # nothing routed: torch's GEMM rejects an empty jagged dim
            return (
                torch.zeros_like(x) if need_x else None,
                torch.zeros_like(weight) if need_w else None,
                weight.new_zeros(weight.shape[:2]) if need_b else None,
                None, None, None, None, None,
            )
        if out is not None:
            grad_out = _relu_backward(grad_out, out)
        grad_out = _aligned(grad_out)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_rows = torch._grouped_mm(grad_out, weight, offs=offsets)
            grad_x = grad_rows if row_index is None else torch.zeros_like(x).index_add_(0, row_index, grad_rows)
        if need_w:
            rows = x if row_index is None else x.index_select(0, row_index)
            grad_w = torch._grouped_mm(grad_out.t(), _aligned(rows), offs=offsets)
        if need_b:
            grad_b = torch.zeros(weight.shape[:2], dtype=torch.float32, device=weight.device)
            grad_b = grad_b.index_add_(0, row_expert, grad_out.float()).to(weight.dtype)
        # Some grouped kernels leave garbage in the slices of empty groups (pytorch#172439).
        _zero_idle(ctx.rows_per_expert, grad_w, grad_b)
        return grad_x, grad_w, grad_b, None, None, None, None, None
