"""Experts and sparse dispatch: equivalence with dense MLPs, sparsity, capacity, empty inputs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from himoe_plugin.core import (
    DenseMLP,
    HierarchicalRouter,
    MoEConfig,
    MoEMLP,
    build_dispatch_plan,
    upcycle_state_dict,
)


def route(config, num_instances=40, num_images=2, scene_dim=8, instance_dim=16, seed=0):
    torch.manual_seed(seed)
    router = HierarchicalRouter(config, scene_dim, instance_dim)
    scene = torch.randn(num_images, scene_dim)
    x = torch.randn(num_instances, instance_dim)
    image_index = torch.arange(num_instances) % num_images
    return router, scene, x, image_index


def dense_reference(moe: MoEMLP, expert: int = 0) -> DenseMLP:
    dense = DenseMLP(moe.dims, moe.experts.activate_output)
    with torch.no_grad():
        for layer, weight, bias in zip(dense.layers, moe.experts.weights, moe.experts.biases):
            layer.weight.copy_(weight[expert])
            layer.bias.copy_(bias[expert])
    return dense


@pytest.mark.parametrize("activate_output", [True, False])
def test_single_expert_equals_dense_mlp_exactly(activate_output):
    config = MoEConfig(num_experts=1, top_k=1, scene_top_k=1)
    router, scene, x, image_index = route(config, instance_dim=16)
    moe = MoEMLP(1, [16, 32, 8], activate_output=activate_output)
    routing = router(scene, x, image_index)
    assert torch.equal(routing.combine_weight, torch.ones(40, 1))
    assert torch.equal(moe(x, routing.plan), dense_reference(moe)(x))


def test_identical_experts_equal_dense_mlp():
    config = MoEConfig(num_experts=8, top_k=2, num_groups=4, scene_top_k=2)
    router, scene, x, image_index = route(config)
    dense = DenseMLP([16, 32, 8])
    moe = MoEMLP(8, [16, 32, 8], shared_expert=True, shared_expert_weight=0.3)
    state = {f"fc{i}.{name}": getattr(layer, name).detach() for i, layer in enumerate(dense.layers)
             for name in ("weight", "bias")}
    assert len(upcycle_state_dict(state, ["fc0", "fc1"], "moe.", moe)) == 4  # 2 layers x (experts, shared)
    moe.load_state_dict({key.removeprefix("moe."): value for key, value in state.items()})
    routing = router(scene, x, image_index)
    # Routing is non-trivial: several experts are used, and weights are not all equal.
    assert routing.expert_index.unique().numel() > 2
    torch.testing.assert_close(moe(x, routing.plan), dense(x), rtol=1e-6, atol=1e-6)


def test_distinct_experts_are_mixed_with_the_routing_weights():
    config = MoEConfig(num_experts=4, top_k=2, scene_top_k=4)
    router, scene, x, image_index = route(config)
    moe = MoEMLP(4, [16, 8])
    routing = router(scene, x, image_index)
    experts = [dense_reference(moe, e)(x) for e in range(4)]
    expected = torch.zeros(40, 8)
    for i in range(40):
        for slot in range(2):
            e = routing.expert_index[i, slot]
            expected[i] += routing.combine_weight[i, slot] * experts[e][i]
    torch.testing.assert_close(moe(x, routing.plan), expected)


@pytest.mark.parametrize("num_experts", [4, 16])
def test_compute_scales_with_top_k_not_with_num_experts(num_experts):
    dims, n, k = [64, 128, 32], 256, 2
    config = MoEConfig(num_experts=num_experts, top_k=k, scene_top_k=num_experts)
    router, scene, x, image_index = route(config, num_instances=n, instance_dim=64)
    moe = MoEMLP(num_experts, dims)
    routing = router(scene, x, image_index)
    with FlopCounterMode(display=False) as counter:
        moe(x, routing.plan)
    per_row = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
    assert counter.get_total_flops() == n * k * per_row
    assert sum(routing.plan.rows_per_expert) == n * k


def test_gradients_reach_both_routers_and_every_selected_expert():
    config = MoEConfig(num_experts=8, top_k=2, num_groups=4, scene_top_k=2)
    router, scene, x, image_index = route(config, num_instances=64)
    moe = MoEMLP(8, [16, 8])
    routing = router(scene, x, image_index)
    task_loss = (moe(x, routing.plan) ** 2).sum()
    task_loss.backward()  # task loss only: no auxiliary loss helps here
    assert router.scene_router.weight.grad.abs().sum() > 0
    assert router.instance_router.weight.grad.abs().sum() > 0
    expert_grad = moe.experts.weights[0].grad.abs().sum(dim=(1, 2))
    selected = routing.expert_index.unique()
    assert (expert_grad[selected] > 0).all()
    unselected = torch.ones(8, dtype=torch.bool)
    unselected[selected] = False
    assert (expert_grad[unselected] == 0).all()


def test_top1_weight_is_one_but_routers_get_the_straight_through_gradient():
    config = MoEConfig(num_experts=8, top_k=1, num_groups=4, scene_top_k=2)
    router, scene, x, image_index = route(config, num_instances=64)
    moe = MoEMLP(8, [16, 8])
    routing = router(scene, x, image_index)
    assert torch.equal(routing.combine_weight, torch.ones(64, 1))
    out = moe(x, routing.plan)
    routers = [router.scene_router.weight, router.instance_router.weight]
    grads = torch.autograd.grad((out**2).sum(), routers, retain_graph=True)
    # Straight-through: d/dtheta of sum_i <dL/dy_i, expert(x_i)> * log p(chosen expert | i),
    # with dL/dy_i = 2 y_i and expert(x_i) = y_i (weight 1, no shared expert).
    log_p = routing.instance_probs.gather(1, routing.expert_index).squeeze(1).log()
    reference = torch.autograd.grad((2 * out.detach().pow(2).sum(1) * log_p).sum(), routers)
    for grad, expected in zip(grads, reference):
        assert expected.norm() > 1e-3
        torch.testing.assert_close(grad, expected)


def test_unused_experts_stay_in_the_autograd_graph():
    config = MoEConfig(num_experts=4, top_k=1, scene_top_k=4)
    moe = MoEMLP(4, [6, 5])
    plan = build_dispatch_plan(
        torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), torch.ones(3, 1), config.num_experts
    )
    moe(torch.randn(3, 6), plan).sum().backward()
    grad = moe.experts.weights[0].grad
    assert grad is not None and grad[1:].abs().sum() == 0 and grad[0].abs().sum() > 0


def test_capacity_drops_exactly_the_lowest_confidence_assignments():
    # 6 instances, all to expert 0 (top-1); capacity 2 keeps the two most confident.
    confidence = torch.tensor([[0.3], [0.9], [0.5], [0.8], [0.1], [0.7]])
    expert_index = torch.tensor([[0], [0], [0], [0], [0], [1]])
    plan = build_dispatch_plan(expert_index, torch.ones(6, 1), confidence, 2, capacity=2)
    assert plan.within_capacity.squeeze(1).tolist() == [False, True, False, True, False, True]
    assert plan.rows_per_expert == [2, 1]
    assert sorted(plan.instance_index[:2].tolist()) == [1, 3]


def test_capacity_factor_from_config_counts_dropped_assignments():
    config = MoEConfig(num_experts=4, top_k=2, scene_top_k=4, capacity_factor=0.5)
    router, scene, x, image_index = route(config, num_instances=40)
    routing = router(scene, x, image_index)
    capacity = config.capacity(40)  # ceil(0.5 * 40 * 2 / 4) = 10
    assert capacity == 10
    assert max(routing.plan.rows_per_expert) <= capacity
    dropped = (~routing.plan.within_capacity).sum().item()
    assert dropped == 80 - sum(routing.plan.rows_per_expert) > 0
    assert routing.statistics["dropped_fraction"].item() == pytest.approx(dropped / 80)
    # A dropped assignment has zero weight; every kept one had at least the confidence of
    # any dropped assignment of the same expert.
    assert (routing.combine_weight[~routing.plan.within_capacity] == 0).all()
    probs = routing.instance_probs.gather(1, routing.expert_index)
    for e in range(4):
        of_e = routing.expert_index == e
        kept, lost = probs[of_e & routing.plan.within_capacity], probs[of_e & ~routing.plan.within_capacity]
        if lost.numel():
            assert kept.min() >= lost.max()


def test_dropless_by_default():
    config = MoEConfig(num_experts=4, top_k=2, scene_top_k=4)
    router, scene, x, image_index = route(config, num_instances=100)
    routing = router(scene, x, image_index)
    assert routing.plan.within_capacity.all() and sum(routing.plan.rows_per_expert) == 200


@pytest.mark.parametrize("instances_per_image", [[0, 5], [0, 0]])
def test_zero_instances_forward_and_backward(instances_per_image):
    config = MoEConfig(num_experts=4, top_k=2, num_groups=2, scene_top_k=1, shared_expert=True)
    torch.manual_seed(0)
    router = HierarchicalRouter(config, 8, 16).train()
    moe = MoEMLP(4, [16, 8], shared_expert=True)
    scene = torch.randn(2, 8)
    n = sum(instances_per_image)
    x = torch.randn(n, 16, requires_grad=True)
    image_index = torch.repeat_interleave(torch.arange(2), torch.tensor(instances_per_image))
    routing = router(scene, x, image_index)
    out = moe(x, routing.plan)
    assert out.shape == (n, 8)
    loss = out.sum() + sum(routing.losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    # Every parameter is reached by backward (so DDP never sees an unused one).
    for name, p in list(router.named_parameters()) + list(moe.named_parameters()):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    stats = routing.statistics
    assert stats["instances_per_image"].item() == n / 2
    if n == 0:
        assert stats["unused_experts"].item() == 4
