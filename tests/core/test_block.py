"""MoEBlock: one layer's route -> experts -> losses -> statistics, masks, reuse, upcycling, guards."""
import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from himoe_plugin.core import (
    LOSS_BALANCE,
    LOSS_SCENE_BALANCE,
    LOSS_Z,
    DenseMLP,
    HierarchicalRouter,
    MoEBlock,
    MoEConfig,
    MoEConfigError,
    collect_routing_statistics,
    masked_token_mean,
    read_coco_supercategories,
)


def make_block(seed=0, dims=(16, 32, 16), activate_output=False, scope="", shared_dims=None,
               **settings):
    config = MoEConfig(**{**dict(num_experts=8, top_k=2, num_groups=4, scene_top_k=2), **settings})
    torch.manual_seed(seed)
    router = HierarchicalRouter(config, 12, dims[0])
    return MoEBlock(router, dims, activate_output, stats_scope=scope, shared_dims=shared_dims)


def batch(num_images=3, per_image=20, dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(num_images, 12, generator=g) * 3
    x = torch.randn(num_images * per_image, dim, generator=g)
    return scene, x, torch.arange(num_images).repeat_interleave(per_image)


def test_block_is_its_router_then_its_experts():
    block = make_block(shared_expert=True).train()
    scene, x, image_index = batch()
    y, routing = block(x, scene, image_index)
    reference_routing = block.router(scene, x, image_index)
    assert torch.equal(routing.expert_index, reference_routing.expert_index)
    torch.testing.assert_close(y, block.moe(x, reference_routing.plan))
    assert set(routing.losses) == {LOSS_BALANCE, LOSS_SCENE_BALANCE, LOSS_Z}
    assert block.statistics.steps == 1  # training forward records its statistics
    block.eval()
    block(x, scene, image_index)
    assert block.statistics.steps == 1  # inference does not


def test_uncounted_instances_are_routed_but_never_enter_losses_or_statistics():
    """DETR denoising queries: computed by their experts, invisible to balance and statistics."""
    block = make_block().train()
    scene, x, image_index = batch()
    counted = torch.rand(len(x), generator=torch.Generator().manual_seed(5)) > 0.4
    y, routing = block(x, scene, image_index, counted=counted)
    # Every instance is routed and computed, counted or not.
    assert routing.expert_index.shape[0] == len(x)
    full_y, full = block(x, scene, image_index)
    assert torch.equal(routing.expert_index, full.expert_index)
    torch.testing.assert_close(y, full_y)
    # Losses and statistics equal those of the counted instances routed alone.
    only_y, only = block(x[counted], scene, image_index[counted])
    for name, value in only.losses.items():
        torch.testing.assert_close(routing.losses[name], value)
    for name, value in only.statistics.items():
        torch.testing.assert_close(routing.statistics[name], value)
    assert not torch.allclose(routing.losses[LOSS_BALANCE], full.losses[LOSS_BALANCE])
    # Changing the uncounted instances changes neither the loss nor its gradient.
    x_changed = x.clone()
    x_changed[~counted] = torch.randn(int((~counted).sum()), x.shape[1]) * 10
    grads = []
    for inputs in (x, x_changed):
        block.zero_grad()
        _, r = block(inputs, scene, image_index, counted=counted)
        r.losses[LOSS_BALANCE].backward()
        grads.append(block.router.instance_router.weight.grad.clone())
    assert grads[0].abs().sum() > 0  # the balance loss is a real gradient
    torch.testing.assert_close(grads[0], grads[1])


def test_a_reused_scene_routing_keeps_the_subsets_and_leaves_scene_losses_to_its_owner():
    first, second = make_block(seed=0).train(), make_block(seed=1).train()
    scene, x, image_index = batch()
    _, routing = first(x, scene, image_index)
    _, reused = second(x, None, image_index, scene=routing.scene)
    assert torch.equal(reused.eligible, routing.eligible)
    assert torch.equal(reused.scene_groups, routing.scene_groups)
    assert (reused.eligible[image_index].gather(1, reused.expert_index)).all()
    assert LOSS_SCENE_BALANCE not in reused.losses and LOSS_BALANCE in reused.losses
    assert "group_usage" not in reused.statistics and "group_usage" in routing.statistics
    reused.losses[LOSS_Z].backward()
    assert second.router.scene_router.weight.grad is None  # its own scene router was not used
    assert second.router.instance_router.weight.grad.abs().sum() > 0


def test_scene_only_routing_gives_every_instance_of_an_image_the_same_experts():
    block = make_block(num_groups=0, scene_top_k=2, top_k=2, instance_router=False)
    assert block.router.instance_router is None
    scene, x, image_index = batch()
    _, routing = block(x, scene, image_index)
    for b in range(3):
        chosen = routing.expert_index[image_index == b]
        assert (chosen == chosen[0]).all()
        assert set(chosen[0].tolist()) == set(routing.eligible[b].nonzero().flatten().tolist())
    with pytest.raises(MoEConfigError, match=r"^num_groups=4: scene-only routing"):
        MoEConfig(num_experts=8, num_groups=4, scene_top_k=2, instance_router=False)


@pytest.mark.parametrize("shared_expert", [False, True])
def test_split_upcycling_partitions_the_dense_ffn(shared_expert):
    torch.manual_seed(0)
    dense = DenseMLP([16, 64, 16], activate_output=False)
    state = {f"ffn.{i}.{n}": getattr(layer, n).detach().clone()
             for i, layer in enumerate(dense.layers) for n in ("weight", "bias")}
    block = make_block(dims=(16, 8, 16), shared_expert=shared_expert, shared_dims=(16, 64, 16))
    report = block.upcycle(state, "block.", ["ffn.0", "ffn.1"], mode="split")
    assert report and not any(k.startswith("ffn.") for k in state)
    block.load_state_dict({k[len("block."):]: v for k, v in state.items()}, strict=False)
    x = torch.randn(50, 16, dtype=torch.float64)
    block.double()
    dense.double()
    # All 8 experts on, uniform weights (what a router gives with every expert at equal
    # probability): exactly the dense FFN.
    experts = block.moe.experts
    hidden = torch.relu(torch.einsum("ehi,ni->neh", experts.weights[0], x) + experts.biases[0])
    outputs = torch.einsum("eoh,neh->neo", experts.weights[1], hidden) + experts.biases[1]
    torch.testing.assert_close(outputs.mean(dim=1), dense(x), rtol=1e-5, atol=1e-5)
    if shared_expert:
        torch.testing.assert_close(block.moe.shared(x), dense(x))
    # Each expert's hidden units are a slice of the dense hidden units.
    torch.testing.assert_close(experts.weights[0][3], dense.layers[0].weight[24:32])
    # Active compute at top-k is k/E of the dense FFN (here 2/8 of the hidden units).
    block.float()
    _, routing = block(x.float(), torch.randn(1, 12), torch.zeros(50, dtype=torch.long))
    with FlopCounterMode(display=False) as counter:
        block.moe.experts(x.float(), routing.plan)
    assert counter.get_total_flops() == 50 * 2 * (2 * 16 * 8 + 2 * 8 * 16)


def test_split_upcycling_rejects_a_dense_ffn_that_experts_cannot_partition():
    dense = DenseMLP([16, 60, 16], activate_output=False)
    state = {f"ffn.{i}.{n}": getattr(layer, n).detach() for i, layer in enumerate(dense.layers)
             for n in ("weight", "bias")}
    block = make_block(dims=(16, 8, 16))
    with pytest.raises(ValueError, match="cannot upcycle 'block.moe'.*do not fit"):
        block.upcycle(state, "block.", ["ffn.0", "ffn.1"], mode="split")


def test_checkpoint_with_another_group_count_fails_naming_the_setting():
    saved = make_block(num_groups=4).state_dict()
    other = make_block(num_groups=2, scene_top_k=1)
    other.router.config_keys["num_groups"] = "MODEL.HIMOE.NUM_GROUPS"
    with pytest.raises(MoEConfigError, match=r"^MODEL\.HIMOE\.NUM_GROUPS=2: the checkpoint's router "
                                             r"at 'router' chooses among 4 expert groups"):
        other.load_state_dict(saved)
    # A checkpoint from before the guard existed (no buffer) still loads.
    legacy = {k: v for k, v in saved.items() if k != "router.num_groups"}
    make_block(num_groups=4).load_state_dict(legacy)


def test_capacity_warning_names_the_setting(caplog):
    block = make_block(num_groups=0, scene_top_k=8, top_k=1, capacity_factor=0.01).train()
    scene, x, image_index = batch()
    with caplog.at_level(logging.WARNING, logger="himoe_plugin"):
        block(x, scene, image_index)
        block(x, scene, image_index)  # rate-limited: one warning
    warnings = [r.getMessage() for r in caplog.records if "capacity limit" in r.getMessage()]
    assert len(warnings) == 1
    assert "capacity_factor=0.01" in warnings[0] and "dropped" in warnings[0]
    caplog.clear()
    dropless = make_block(num_groups=0, scene_top_k=8, top_k=1).train()
    with caplog.at_level(logging.WARNING, logger="himoe_plugin"):
        dropless(x, scene, image_index)
    assert not caplog.records


def test_statistics_of_every_block_are_collected_under_their_scopes():
    model = torch.nn.ModuleDict({"a": make_block(scope="enc0"), "b": make_block()}).train()
    scene, x, image_index = batch()
    for _ in range(2):
        model["a"](x, scene, image_index)
    model["b"](x[:7], scene, image_index[:7])
    stats = collect_routing_statistics(model)
    assert stats["himoe/enc0/instances_per_image"] == pytest.approx(20.0)
    assert stats["himoe/b/instances_per_image"] == pytest.approx(7 / 3)
    assert sum(stats[f"himoe/enc0/expert_load/{e}"] for e in range(8)) == pytest.approx(1.0)
    assert collect_routing_statistics(model) == {}  # read out once, then reset
    single = make_block().train()
    single(x, scene, image_index)
    assert "himoe/routing_entropy" in collect_routing_statistics(single)


def test_masked_token_mean_counts_only_valid_tokens():
    tokens = torch.randn(2, 5, 3)
    valid = torch.tensor([[True, False, True, False, False], [False] * 5])
    pooled = masked_token_mean(tokens.half(), valid)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[0], tokens.half().float()[0, [0, 2]].mean(0))
    assert torch.equal(pooled[1], torch.zeros(3))


def test_coco_supercategories_in_label_order(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('{"categories": [{"id": 3, "name": "c", "supercategory": "z"},'
                    '{"id": 1, "name": "a", "supercategory": "y"}, {"id": 2, "name": "b"}]}')
    with pytest.raises(ValueError, match=r"without a supercategory: \['b'\]"):
        read_coco_supercategories(str(path))
    assert read_coco_supercategories(str(path), [3, 1]) == ["z", "y"]


def test_expert_backend_setting_reaches_the_experts_and_errors_name_its_key():
    block = make_block(expert_backend="loop")
    assert block.moe.experts.expert_backend == "loop"
    config = MoEConfig(num_experts=8, top_k=2, num_groups=4, scene_top_k=2, expert_backend="grouped_mm")
    router = HierarchicalRouter(config, 12, 12, config_keys={"expert_backend": "MODEL.HIMOE.EXPERT_BACKEND"})
    with pytest.raises(MoEConfigError, match=r"^MODEL\.HIMOE\.EXPERT_BACKEND='grouped_mm': .*multiple of 8"):
        MoEBlock(router, [12, 20, 12])  # widths 12 and 20 are not 16-byte aligned rows
    grouped = MoEBlock(router, [16, 32, 16])
    assert grouped.moe.experts.expert_backend == "grouped_mm"


def keyed(block):
    block.router.config_keys.update({name: f"MODEL.HIMOE.{name.upper()}" for name in (
        "shared_expert", "instance_router", "instance_uses_scene_probs", "expert_dim", "route_once")})
    return block


@pytest.mark.parametrize("saved, loaded, message", [
    (dict(shared_expert=True), {}, r"^MODEL\.HIMOE\.SHARED_EXPERT=False: .* has shared expert but this model has none"),
    ({}, dict(shared_expert=True), r"^MODEL\.HIMOE\.SHARED_EXPERT=True: .* has no shared expert"),
    ({}, dict(instance_uses_scene_probs=False),
     r"^MODEL\.HIMOE\.INSTANCE_USES_SCENE_PROBS=False: .* instance router that sees the scene probabilities"),
    (dict(num_groups=0, scene_top_k=8, instance_router=False), dict(num_groups=0, scene_top_k=8),
     r"^MODEL\.HIMOE\.INSTANCE_ROUTER=True: .* routes on the scene alone"),
    ({}, dict(dims=(16, 24, 16)), r"^MODEL\.HIMOE\.EXPERT_DIM=\[24\]: .* experts of widths \[16, 32, 16\]"),
])
def test_checkpoint_with_another_tensor_layout_fails_naming_the_setting(saved, loaded, message):
    """Without the guard a non-strict checkpointer skips these tensors and leaves them random."""
    state = make_block(**saved).state_dict()
    with pytest.raises(MoEConfigError, match=message):
        keyed(make_block(**loaded)).load_state_dict(state, strict=False)


def test_checkpoint_of_a_stage_that_reused_the_routing_fails_in_a_stage_that_routes():
    later = make_block()
    later.router.reuse_routing("scene")
    with pytest.raises(MoEConfigError, match=r"^MODEL\.HIMOE\.ROUTE_ONCE='': .* reuses the routing of stage 0"):
        keyed(make_block()).load_state_dict(later.state_dict(), strict=False)
    routing_stage = make_block().state_dict()
    with pytest.raises(MoEConfigError, match=r"^MODEL\.HIMOE\.ROUTE_ONCE='scene': .* routes its scene itself"):
        keyed(later).load_state_dict(routing_stage, strict=False)
    # Matching checkpoints, and those written before the records existed, load strictly.
    make_block(shared_expert=True).load_state_dict(make_block(shared_expert=True).state_dict())
    legacy = {k: v for k, v in make_block().state_dict().items()
              if not k.endswith(("instance_routing", "expert_dims"))}
    make_block().load_state_dict(legacy)
