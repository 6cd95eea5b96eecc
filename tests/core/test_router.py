"""Hierarchical routing: subsets, weights, losses, float32 under autocast, validation."""
import math

import pytest
import torch

from himoe_plugin.core import (
    LOSS_BALANCE,
    LOSS_SCENE_BALANCE,
    LOSS_SCENE_SUPERVISION,
    LOSS_Z,
    HierarchicalRouter,
    MoEConfig,
    MoEConfigError,
    RoutingStatsMeter,
    masked_mean_pool,
    scene_targets_from_labels,
    switch_balance_loss,
    weighted_losses,
)


def make_router(seed=0, **overrides):
    settings = dict(num_experts=8, top_k=2, num_groups=4, scene_top_k=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    return HierarchicalRouter(MoEConfig(**settings), scene_dim=12, instance_dim=20)


def weighted(router, routing):
    """The losses as Detectron2 adds them: each term times its MoEConfig weight (0: left out)."""
    return weighted_losses(routing.losses, router.config)


def random_batch(num_images=4, per_image=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(num_images, 12, generator=g) * 5
    x = torch.randn(num_images * per_image, 20, generator=g) * 5
    image_index = torch.arange(num_images).repeat_interleave(per_image)
    return scene, x, image_index


def test_instances_only_reach_experts_of_their_image_subset():
    router = make_router()
    scene, x, image_index = random_batch()
    routing = router(scene, x, image_index)
    # Images kept different subsets, so the constraint is not trivially satisfied.
    assert len({tuple(sorted(g.tolist())) for g in routing.scene_groups}) > 1
    assert routing.eligible.sum(dim=1).eq(4).all()  # 2 groups x 2 experts
    allowed = routing.eligible[image_index].gather(1, routing.expert_index)
    assert allowed.all()
    groups_of_choice = routing.expert_index // 2
    for i, b in enumerate(image_index.tolist()):
        assert set(groups_of_choice[i].tolist()) <= set(routing.scene_groups[b].tolist())
    assert (routing.instance_probs[~routing.eligible[image_index]] == 0).all()


def test_scene_router_picks_the_top_groups_per_image():
    router = make_router()
    scene, x, image_index = random_batch()
    routing = router(scene, x, image_index)
    expected = routing.scene_probs.topk(2, dim=1).indices
    assert torch.equal(routing.scene_groups.sort(1).values, expected.sort(1).values)
    torch.testing.assert_close(routing.scene_probs.sum(1), torch.ones(4))


def test_top_k_weights_sum_to_one_and_follow_probabilities():
    router = make_router(top_k=3)
    scene, x, image_index = random_batch()
    routing = router(scene, x, image_index)
    torch.testing.assert_close(routing.combine_weight.sum(1), torch.ones(x.shape[0]))
    top = routing.instance_probs.gather(1, routing.expert_index)
    torch.testing.assert_close(routing.combine_weight, top / top.sum(1, keepdim=True))
    assert (routing.combine_weight[:, :-1] >= routing.combine_weight[:, 1:]).all()


def test_scene_temperature_sharpens_scene_distribution():
    scene, x, image_index = random_batch()
    soft = make_router(scene_temperature=4.0)(scene, x, image_index).scene_probs
    sharp = make_router(scene_temperature=0.25)(scene, x, image_index).scene_probs
    assert sharp.max(1).values.min() > soft.max(1).values.max()


def test_balance_loss_is_its_weight_at_uniform_load_and_grows_with_imbalance():
    uniform = torch.full((8,), 1 / 8)
    assert switch_balance_loss(uniform, uniform).item() == pytest.approx(1.0)
    skewed = torch.tensor([0.5, 0.3, 0.1, 0.1, 0, 0, 0, 0])
    more = torch.tensor([0.9, 0.1, 0, 0, 0, 0, 0, 0])
    assert switch_balance_loss(skewed, skewed) > 1.0
    assert switch_balance_loss(more, more) > switch_balance_loss(skewed, skewed)

    # Through the router: zero router weights give uniform probabilities; instances spread
    # evenly over experts (8 instances, top-1, each image keeps every expert) -> loss = weight.
    router = make_router(num_groups=0, scene_top_k=8, top_k=1, balance_loss_weight=0.25)
    with torch.no_grad():
        router.instance_router.weight.zero_()
        router.scene_router.weight.zero_()
        router.instance_router.bias.copy_(torch.linspace(0, 1e-3, 8))
    router.train()
    scene = torch.zeros(2, 12)
    # One instance per expert: a one-hot bias dominating only its own instance's row.
    x = torch.zeros(8, 20)
    routing_uniform_probs = router(scene, x, torch.zeros(8, dtype=torch.long))
    # All 8 go to the same expert (argmax of the bias): maximal imbalance.
    assert routing_uniform_probs.statistics["expert_load"].max().item() == 1.0
    loss_all_one = weighted(router, routing_uniform_probs)[LOSS_BALANCE].item()
    assert loss_all_one == pytest.approx(0.25 * 8 * (1 / 8 + 1e-4), rel=1e-2)

    with torch.no_grad():
        router.instance_router.bias.zero_()
        router.instance_router.weight.zero_()
        router.instance_router.weight[:, :8] = torch.eye(8) * 10
    routing = router(scene, torch.eye(8, 20), torch.zeros(8, dtype=torch.long))
    assert routing.statistics["expert_load"].tolist() == [1 / 8] * 8
    # f uniform -> loss = weight * 8 * sum(1/8 * P_e) = weight exactly (P sums to 1).
    assert weighted(router, routing)[LOSS_BALANCE].item() == pytest.approx(0.25, rel=1e-6)
    assert routing.losses[LOSS_BALANCE].item() == pytest.approx(1.0, rel=1e-6)  # unweighted


def test_auxiliary_losses_exist_in_training_only_and_are_differentiable():
    router = make_router(z_loss_weight=1e-3).train()
    scene, x, image_index = random_batch()
    routing = router(scene, x, image_index)
    assert set(routing.losses) == {LOSS_BALANCE, LOSS_SCENE_BALANCE, LOSS_Z}
    sum(routing.losses.values()).backward()
    assert router.scene_router.weight.grad.abs().sum() > 0
    assert router.instance_router.weight.grad.abs().sum() > 0
    router.eval()
    assert router(scene, x, image_index).losses == {}


def test_balance_loss_gradient_flattens_the_load():
    router = make_router(num_groups=0, scene_top_k=8, top_k=1, balance_loss_weight=1.0)
    with torch.no_grad():
        router.instance_router.bias.copy_(torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0]))
    scene, x, image_index = random_batch()
    before = router(scene, x, image_index).losses[LOSS_BALANCE].item()
    optimizer = torch.optim.SGD(router.parameters(), lr=0.5)
    for _ in range(30):
        optimizer.zero_grad()
        router(scene, x, image_index).losses[LOSS_BALANCE].backward()
        optimizer.step()
    after = router(scene, x, image_index)
    assert after.losses[LOSS_BALANCE].item() < before
    assert after.statistics["expert_load"].max() < 0.5


def test_z_loss_matches_definition():
    router = make_router(z_loss_weight=0.5, balance_loss_weight=0, scene_balance_loss_weight=0)
    scene, x, image_index = random_batch()
    routing = router(scene, x, image_index)
    inst_in = torch.cat([router.instance_norm(x), routing.scene_probs[image_index]], 1)
    inst_logits = router.instance_router(inst_in)
    scene_logits = router.scene_router(router.scene_norm(scene))
    expected = 0.5 * (
        torch.logsumexp(inst_logits, 1).square().mean() + torch.logsumexp(scene_logits, 1).square().mean()
    )
    torch.testing.assert_close(weighted(router, routing)[LOSS_Z], expected)
    assert set(weighted(router, routing)) == {LOSS_Z}
    # The core's terms are unweighted (MMDetection's loss modules apply their own loss_weight).
    torch.testing.assert_close(routing.losses[LOSS_Z], expected / 0.5)


def test_scene_supervision_pulls_scene_router_to_supercategories():
    class_to_group = torch.tensor([0, 0, 1, 2, 3, 3])
    labels = [torch.tensor([0, 1, 1]), torch.tensor([4]), torch.tensor([], dtype=torch.long)]
    targets, has_target = scene_targets_from_labels(labels, class_to_group, 4)
    assert targets.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert has_target.tolist() == [True, True, False]

    router = make_router(scene_supervision_weight=1.0, balance_loss_weight=0, z_loss_weight=0,
                         scene_balance_loss_weight=0).train()
    scene = torch.randn(3, 12)
    x, image_index = torch.randn(6, 20), torch.tensor([0, 0, 1, 1, 2, 2])
    optimizer = torch.optim.SGD(router.parameters(), lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        routing = router(scene, x, image_index, scene_targets=(targets, has_target))
        routing.losses[LOSS_SCENE_SUPERVISION].backward()
        optimizer.step()
    probs = router(scene, x, image_index).scene_probs
    assert probs[0, 0] > 0.9 and probs[1, 3] > 0.9


def test_router_math_is_float32_under_bf16_autocast():
    router = make_router()
    scene, x, image_index = random_batch()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scene_bf16 = torch.nn.Linear(12, 12)(scene)  # bf16 activations, as in a real backbone
        assert scene_bf16.dtype == torch.bfloat16
        routing = router(scene_bf16, x.bfloat16(), image_index)
    for tensor in (routing.instance_probs, routing.scene_probs, routing.combine_weight):
        assert tensor.dtype == torch.float32
    for loss in routing.losses.values():
        assert loss.dtype == torch.float32
    reference = router(scene_bf16.float(), x.bfloat16().float(), image_index)
    torch.testing.assert_close(routing.instance_probs, reference.instance_probs)


def test_masked_mean_pool_ignores_padding():
    torch.manual_seed(0)
    a = torch.randn(1, 3, 8, 6)
    padded = torch.full((2, 3, 10, 10), 1e6)
    padded[0, :, :8, :6] = a[0]
    padded[1] = torch.randn(3, 10, 10)
    small = torch.randn(1, 3, 4, 3)
    padded_small = torch.full((2, 3, 5, 5), -1e6)
    padded_small[0, :, :4, :3] = small[0]
    padded_small[1] = torch.randn(3, 5, 5)
    pooled = masked_mean_pool([padded, padded_small], [4, 8], [(32, 24), (40, 40)])
    expected = (a.mean(dim=(2, 3)) + small.mean(dim=(2, 3))) / 2
    torch.testing.assert_close(pooled[0:1], expected)
    torch.testing.assert_close(pooled[1], (padded[1].mean((1, 2)) + padded_small[1].mean((1, 2))) / 2)


def test_masked_mean_pool_does_not_overflow_half_precision():
    # A stride-4 map of an 800x1333 image has 66,800 cells: more than float16 can count to.
    features = torch.full((1, 2, 200, 334), 1.5, dtype=torch.float16)
    pooled = masked_mean_pool([features], [4], [(800, 1333)])
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.full((1, 2), 1.5))


def test_stats_meter_averages_and_resets():
    meter = RoutingStatsMeter()
    meter.update({"expert_load": torch.tensor([1.0, 0.0]), "routing_entropy": torch.tensor(2.0)})
    meter.update({"expert_load": torch.tensor([0.0, 1.0]), "routing_entropy": torch.tensor(4.0)})
    assert meter.summary("moe/") == {
        "moe/expert_load/0": 0.5,
        "moe/expert_load/1": 0.5,
        "moe/routing_entropy": 3.0,
    }
    assert meter.summary() == {}


@pytest.mark.parametrize(
    "settings, key",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=8, top_k=0), "top_k"),
        (dict(num_experts=8, num_groups=3), "num_groups"),
        (dict(num_experts=8, num_groups=16), "num_groups"),
        (dict(num_experts=8, num_groups=4, scene_top_k=5), "scene_top_k"),
        (dict(num_experts=8, num_groups=4, scene_top_k=1, top_k=3), "top_k"),
        (dict(num_experts=8, scene_top_k=2, top_k=3), "top_k"),
        (dict(scene_temperature=0.0), "scene_temperature"),
        (dict(scene_noise_std=-1.0), "scene_noise_std"),
        (dict(instance_jitter=1.0), "instance_jitter"),
        (dict(shared_expert_weight=1.0), "shared_expert_weight"),
        (dict(capacity_factor=-0.5), "capacity_factor"),
        (dict(balance_loss_weight=math.nan), "balance_loss_weight"),
        (dict(top_k=2.0), "top_k"),
        (dict(shared_expert="yes"), "shared_expert"),
    ],
)
def test_invalid_settings_name_the_setting(settings, key):
    with pytest.raises(ValueError, match=rf"^{key}="):
        MoEConfig(**settings)


def test_config_errors_can_be_renamed_for_a_framework():
    with pytest.raises(MoEConfigError, match=r"^MODEL\.HIMOE\.TOP_K=9: larger than the scene subset"):
        MoEConfig.from_mapping({"num_experts": 8, "top_k": 9}, key_of=lambda k: f"MODEL.HIMOE.{k.upper()}")
    with pytest.raises(MoEConfigError, match=r"^moe\.topk="):
        MoEConfig.from_mapping({"topk": 2}, key_of=lambda k: f"moe.{k}")
