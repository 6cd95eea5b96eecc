"""Route once, reuse in later layers (cascade stages): routers that take the scene or the whole
routing from another one, routings of a subset of the instances, gradients to the first router."""
import pytest
import torch
from .test_block import batch, make_block

from himoe_plugin.core import LOSS_BALANCE, LOSS_Z, RoutingPass


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


def test_routing_pass_gives_each_cascade_stage_what_it_takes_from_the_earlier_ones():
    scene, x, image_index = batch()
    calls = []

    def box_head(features, scene_features, index, targets, scene=None, routing=None):
        calls.append((scene_features, targets, scene, routing))
        if routing is None:
            routing = blocks[len(calls) - 1](features, scene_features, index, scene=scene)[1]
        return features, routing

    blocks = [make_block(seed=s).eval() for s in range(3)]
    blocks[1].router.reuse_routing("scene")
    blocks[2].router.reuse_routing("scene")
    targets = (torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool))
    scene_pass = RoutingPass(scene, targets, route_once="scene")
    for stage in range(3):
        scene_pass.run_stage(stage, box_head, x, image_index)
    assert calls[0][0] is scene and calls[0][1] is targets and calls[0][2] is None
    assert all(c[0] is None and c[1] is None and c[2] is scene_pass.routings[0].scene for c in calls[1:])
    assert len(scene_pass.routings) == 3

    calls.clear()
    every_stage = RoutingPass(scene, route_once="")
    blocks = [make_block(seed=s).eval() for s in range(2)]
    for stage in range(2):
        every_stage.run_stage(stage, box_head, x, image_index)
    assert all(c[0] is scene and c[2] is None and c[3] is None for c in calls)

    calls.clear()
    instance_pass = RoutingPass(scene, route_once="instance")
    blocks = [make_block(seed=0).eval()]
    instance_pass.run_stage(0, box_head, x, image_index)
    instance_pass.rows = torch.tensor([4, 1])  # the RoIs the next stage keeps
    _, routing1 = instance_pass.run_stage(1, box_head, x[[4, 1]], image_index[[4, 1]])
    assert torch.equal(routing1.expert_index, instance_pass.routings[0].expert_index[[4, 1]])
    assert instance_pass.rows is None  # used once
    _, routing2 = instance_pass.run_stage(2, box_head, x[[4, 1]], image_index[[4, 1]])
    assert routing2 is routing1  # the previous stage's, same RoIs
    with pytest.raises(RuntimeError, match="stage 1 runs after 3 stages"):
        instance_pass.run_stage(1, box_head, x, image_index)
