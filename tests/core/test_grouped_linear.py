"""Expert backends: torch's grouped GEMM path equals the loop path, forward and backward, on CPU.

On CPU ``torch._grouped_mm`` runs the same input validation as on CUDA (int32 offsets, 16-byte
aligned strides, no bias, dtypes) and then its per-group fallback, the code CUDA runs on GPUs
without the CUTLASS kernel. So these tests exercise, through the real op, everything the
package feeds it: offsets, operand layouts of the three GEMMs, the separate bias and its
gradient, the fused gather, zero gradients for idle experts, zero routed rows. Not covered
here: the sm90/sm100 CUTLASS kernel itself and the 16-byte data-pointer check, which torch
applies only on CUDA.
"""
import copy

import pytest
import torch

from himoe_plugin.core import MoEConfig, MoEConfigError, StackedMLPExperts, build_dispatch_plan
from himoe_plugin.core.grouped_linear import grouped_mm_qualifies, resolve_backend


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Counts the calls that reach ``torch._grouped_mm``."""
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls


def plan_for(expert_index, num_experts, capacity=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n, k = expert_index.shape
    weights = torch.rand(n, k, generator=generator).requires_grad_()
    confidence = torch.rand(n, k, generator=generator)
    return build_dispatch_plan(expert_index, weights, confidence, num_experts, capacity), weights


def twin_experts(num_experts, dims, activate_output):
    torch.manual_seed(0)
    loop = StackedMLPExperts(num_experts, dims, activate_output, expert_backend="loop")
    grouped = copy.deepcopy(loop)
    grouped.expert_backend = "grouped_mm"
    return loop, grouped


def run(experts, x, plan, weights, upstream, autocast_dtype=None):
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = experts(x, plan)
    # The routing weights get their gradient through the combine step of either backend.
    weight_grad, = torch.autograd.grad((out.float() * upstream).sum(), [weights], retain_graph=True)
    (out.float() * upstream).sum().backward(retain_graph=True)
    grads = [x.grad] + [p.grad for p in experts.parameters()]
    return out, grads, weight_grad


@pytest.mark.parametrize("activate_output", [True, False])
@pytest.mark.parametrize("capacity", [0, 5])
def test_grouped_mm_backend_matches_loop_in_value_and_gradient(grouped_mm_calls, activate_output, capacity):
    torch.manual_seed(1)
    num_experts, dims, n = 6, [16, 24, 8], 20
    # top-2 (every instance feeds two experts: the input gradient accumulates), experts 1 and 4
    # get nothing (their gradients must be exact zeros), capacity 5 drops some assignments.
    expert_index = torch.stack([torch.randint(0, 2, (n,)) * 2, torch.full((n,), 5)], dim=1)
    expert_index[:3, 0] = 3
    plan, weights = plan_for(expert_index, num_experts, capacity)
    assert plan.rows_per_expert[1] == plan.rows_per_expert[4] == 0
    assert (not plan.within_capacity.all()) == (capacity > 0)
    loop, grouped = twin_experts(num_experts, dims, activate_output)
    x, upstream = torch.randn(n, dims[0]), torch.randn(n, dims[-1])

    out_loop, grads_loop, w_loop = run(loop, x, plan, weights, upstream)
    assert grouped_mm_calls == []
    out_grouped, grads_grouped, w_grouped = run(grouped, x, plan, weights, upstream)
    assert len(grouped_mm_calls) == 3 * (len(dims) - 1)  # forward, input and weight gradients per layer

    torch.testing.assert_close(out_grouped, out_loop)
    torch.testing.assert_close(w_grouped, w_loop)
    for got, expected in zip(grads_grouped, grads_loop):
        torch.testing.assert_close(got, expected)
    for grad in grads_grouped[1:]:
        assert (grad[[1, 4]] == 0).all()
        assert (grad[[0, 2, 3, 5]].flatten(1).abs().sum(1) > 0).all()


def test_grouped_mm_backend_matches_loop_under_bfloat16_autocast(grouped_mm_calls):
    torch.manual_seed(2)
    num_experts, dims, n = 4, [32, 16], 24
    plan, weights = plan_for(torch.randint(0, 3, (n, 1)), num_experts)
    loop, grouped = twin_experts(num_experts, dims, True)
    x, upstream = torch.randn(n, dims[0]), torch.randn(n, dims[-1])

    out_loop, grads_loop, _ = run(loop, x, plan, weights, upstream, torch.bfloat16)
    out_grouped, grads_grouped, _ = run(grouped, x, plan, weights, upstream, torch.bfloat16)
    assert len(grouped_mm_calls) == 3 and out_grouped.dtype == torch.bfloat16
    torch.testing.assert_close(out_grouped, out_loop, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads_grouped, grads_loop):
        assert got.dtype == torch.float32  # float32 parameters keep float32 gradients
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=5e-2)
    assert (grads_grouped[1][3] == 0).all()  # expert 3 had no rows


def test_grouped_mm_backend_with_no_routed_rows():
    loop, grouped = twin_experts(4, [8, 16], True)
    plan, weights = plan_for(torch.zeros(0, 2, dtype=torch.long), 4)
    for experts in (loop, grouped):
        x = torch.randn(0, 8, requires_grad=True)
        out = experts(x, plan)
        assert out.shape == (0, 16)
        out.sum().backward(retain_graph=True)
        assert all(p.grad is not None and (p.grad == 0).all() for p in experts.parameters())


def test_auto_backend_picks_the_grouped_kernel_only_where_torch_has_one():
    bf16, fp32, fp16 = torch.bfloat16, torch.float32, torch.float16
    shape = (8, 1024, 12544)
    assert grouped_mm_qualifies("cuda", (9, 0), bf16, shape)  # H100
    assert grouped_mm_qualifies("cuda", (10, 0), bf16, shape)  # B200
    assert not grouped_mm_qualifies("cuda", (8, 0), bf16, shape)  # A100: torch loops itself
    assert not grouped_mm_qualifies("cuda", (9, 0), fp32, shape)
    assert not grouped_mm_qualifies("cuda", (9, 0), fp16, shape)
    assert not grouped_mm_qualifies("cuda", (9, 0), bf16, (8, 1024, 1001))  # unaligned rows
    assert not grouped_mm_qualifies("cuda", (9, 0), bf16, (1024, 1024, 1024))  # too many groups
    assert not grouped_mm_qualifies("cpu", None, bf16, shape)
    x, weight = torch.randn(4, 16), torch.randn(2, 8, 16)
    assert resolve_backend("auto", x, weight) == "loop"
    assert resolve_backend("grouped_mm", x, weight) == "grouped_mm"


def test_invalid_or_impossible_expert_backend_names_the_setting(monkeypatch):
    with pytest.raises(MoEConfigError, match=r"expert_backend='fast'.*auto.*loop.*grouped_mm"):
        MoEConfig(expert_backend="fast")
    with pytest.raises(MoEConfigError, match=r"MODEL\.HIMOE\.EXPERT_BACKEND='cuda'"):
        MoEConfig.from_mapping({"expert_backend": "cuda"}, key_of=lambda key: f"MODEL.HIMOE.{key.upper()}")
    with pytest.raises(MoEConfigError, match=r"head\.expert_backend='grouped_mm'.*multiple of 8.*\[12, 8\]"):
        StackedMLPExperts(4, [12, 8], expert_backend="grouped_mm", expert_backend_key="head.expert_backend")
    experts = StackedMLPExperts(2, [8, 8], expert_backend="grouped_mm")
    plan, _ = plan_for(torch.zeros(3, 1, dtype=torch.long), 2)
    with pytest.raises(MoEConfigError, match=r"expert_backend='grouped_mm'.*torch\.float64"):
        experts.double()(torch.randn(3, 8, dtype=torch.float64), plan)
    monkeypatch.delattr(torch, "_grouped_mm")
    with pytest.raises(MoEConfigError, match=r"expert_backend='grouped_mm'.*has no grouped GEMM"):
        MoEConfig(expert_backend="grouped_mm")
    assert MoEConfig(expert_backend="auto").expert_backend == "auto"


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_linear_matches_per_expert_linear_in_value_and_gradient(relu, gather):
    from himoe_plugin.core.grouped_linear import grouped_linear

    torch.manual_seed(0)
    rows = [3, 0, 5, 1]  # an expert without rows in the middle
    # With ``gather`` the input rows are picked by an index (repeats and a skipped row, as
    # with top-2 routing and a dropped assignment) inside the op.
    row_index = torch.tensor([0, 4, 2, 6, 1, 4, 3, 0, 5]) if gather else None
    x = torch.randn(8 if gather else 9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(9, 5, dtype=torch.float64)

    def op(a, w, b):
        return grouped_linear(a, w, b, rows, row_index=row_index, relu=relu)

    out = op(x, weight, bias)
    grads = torch.autograd.grad((out * upstream).sum(), (x, weight, bias))
    chunks = torch.split(x if row_index is None else x[row_index], rows)
    reference = torch.cat([torch.nn.functional.linear(c, weight[e], bias[e]) for e, c in enumerate(chunks)])
    reference = reference.relu() if relu else reference
    ref_grads = torch.autograd.grad((reference * upstream).sum(), (x, weight, bias))
    torch.testing.assert_close(out, reference)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)
    assert (grads[1][1] == 0).all() and (grads[2][1] == 0).all()
    if gather:
        assert (grads[0][7] == 0).all()  # row 7 is never picked
    assert torch.autograd.gradcheck(op, (x, weight, bias))


@pytest.mark.parametrize("top_k, capacity", [(1, 0), (2, 0), (2, 2)])
def test_combine_gradient_matches_finite_differences(top_k, capacity):
    from himoe_plugin.core.experts import combine

    torch.manual_seed(0)
    expert_index = torch.stack([torch.randperm(4)[:top_k] for _ in range(7)])
    weights = torch.rand(7, top_k, dtype=torch.float64, requires_grad=True)
    plan = build_dispatch_plan(expert_index, weights, torch.rand(7, top_k), 4, capacity)
    rows = torch.randn(sum(plan.rows_per_expert), 5, dtype=torch.float64, requires_grad=True)
    assert (not plan.within_capacity.all()) == (capacity > 0)

    def combined(expert_rows, routing_weights):
        plan.combine_weight = routing_weights.reshape(-1)[plan.slot]
        return combine(expert_rows, plan)

    assert torch.autograd.gradcheck(combined, (rows, weights))


def test_grouped_linear_follows_autocast_and_keeps_float32_parameter_grads():
    from himoe_plugin.core.grouped_linear import grouped_linear

    x = torch.randn(7, 6, requires_grad=True)
    weight = torch.randn(2, 4, 6, requires_grad=True)
    bias = torch.randn(2, 4, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = grouped_linear(x, weight, bias, [4, 3])
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    reference = torch.cat([x[:4] @ weight[0].T + bias[0], x[4:] @ weight[1].T + bias[1]])
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=5e-2)
