"""Route once, reuse in later layers (cascade stages): routers that take the scene or the whole
routing from another one, routings of a subset of the instances, gradients to the first router."""
import pytest
import torch
from test_block import batch, make_block

from himoe_plugin.core import LOSS_BALANCE, LOSS_Z, stage_reuse


def names(module):
    return {name for name, _ in module.named_parameters()}


def test_scene_reusing_router_has_no_scene_router_and_routes_inside_the_given_subsets():
    first, second = make_block(seed=0).train(), make_block(seed=1).train()
    second.router.reuse_routing("scene")
    assert names(second.router) == {"instance_router.weight", "instance_router.bias"}
    scene, x, image_index = batch()
    _, routing = first(x, scene, image_index)
    y, reused = second(x, None, image_index, scene=routing.scene)
    assert reused.scene is routing.scene
    # Every instance uses experts of its image's subset, chosen by the second instance router.
    assert reused.eligible[image_index].gather(1, reused.expert_index).all()
    assert not torch.equal(reused.expert_index, routing.expert_index)
    # Scene-level losses and statistics belong to the first router.
    assert set(reused.losses) == {LOSS_BALANCE, LOSS_Z} and "group_usage" not in reused.statistics
    with pytest.raises(RuntimeError, match=r"reuses the scene routing of another one .*\(scene="):
        second(x, scene, image_index)


def test_block_reusing_the_whole_routing_runs_its_experts_on_it_and_records_nothing():
    first, later = make_block(seed=0).train(), make_block(seed=1).train()
    later.router.reuse_routing("instance")
    assert names(later.router) == set()
    scene, x, image_index = batch()
    _, routing = first(x, scene, image_index)
    y, same = later(x, None, image_index, routing=routing)
    assert same is routing
    torch.testing.assert_close(y, later.moe(x, routing.plan))
    assert later.statistics.steps == 0  # the statistics belong to the block that routed
    with pytest.raises(RuntimeError, match=r"reuses the instance routing .* routing=\.\.\."):
        later(x, scene, image_index)


def test_routing_of_a_subset_of_instances_gives_those_instances_the_same_outputs():
    block = make_block(shared_expert=True).eval()
    scene, x, image_index = batch()
    with torch.no_grad():
        y, routing = block(x, scene, image_index)
        rows = torch.tensor([59, 3, 3, 17, 40, 0])  # any order, repeats allowed
        subset = routing.select(rows)
        assert torch.equal(subset.expert_index, routing.expert_index[rows])
        assert subset.plan.num_instances == len(rows)
        assert sum(subset.plan.rows_per_expert) == len(rows) * 2
        y_subset, _ = block(x[rows], None, image_index[rows], routing=subset)
    torch.testing.assert_close(y_subset, y[rows])


def test_later_layers_train_the_router_that_routed_once():
    first, later = make_block(seed=0).train(), make_block(seed=1).train()
    later.router.reuse_routing("instance")
    scene, x, image_index = batch()
    _, routing = first(x, scene, image_index)
    rows = torch.arange(0, len(x), 2)
    y, _ = later(x[rows], None, image_index[rows], routing=routing.select(rows))
    y.square().sum().backward()
    assert first.router.instance_router.weight.grad.abs().sum() > 0
    assert first.router.scene_router.weight.grad.abs().sum() > 0
    assert later.moe.experts.weights[0].grad.abs().sum() > 0


def test_unknown_part_is_rejected():
    with pytest.raises(ValueError, match=r"part='instances', expected one of \('scene', 'instance'\)"):
        make_block().router.reuse_routing("instances")


def test_stage_reuse_says_what_each_cascade_stage_takes_from_the_earlier_ones():
    first, second = make_block(seed=0).eval(), make_block(seed=1).eval()
    scene, x, image_index = batch()
    _, routing0 = first(x, scene, image_index)
    _, routing1 = second(x, None, image_index, scene=routing0.scene)
    routings = [routing0, routing1]
    assert stage_reuse("instance", 0, [], None) == {} and stage_reuse("", 2, routings, None) == {}
    assert stage_reuse("scene", 2, routings, None)["scene"] is routing0.scene
    assert stage_reuse("instance", 2, routings, None)["routing"] is routing1  # the previous stage's
    rows = torch.tensor([4, 1])
    kept = stage_reuse("instance", 2, routings, rows)["routing"]
    assert torch.equal(kept.expert_index, routing1.expert_index[rows])
