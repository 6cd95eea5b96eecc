"""Exported HI-MoE layers stay exact and sparse on any input (TorchScript trace, ONNX Runtime).

Each model is traced or exported on one sample (A) and run on others (B..F) with other instance
and image counts, hence other routings: outputs and experts must equal eager inference.
"""
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from himoe_plugin.core import (
    HierarchicalRouter,
    MoEBlock,
    MoEConfig,
    ExportDispatchPlan,
    exporting,
    masked_mean_pool,
)

SCENE_DIM, DIM = 12, 16
#: (instances per image, images) of the samples the exported models run on (B..F).
SAMPLES = [(7, 1), (30, 2), (5, 4), (1, 1), (13, 3)]

VARIANTS = {
    "k2": dict(top_k=2),
    "k1": dict(top_k=1),
    "k2_shared": dict(top_k=2, shared_expert=True),
    "k1_shared_scene_probs": dict(top_k=1, shared_expert=True, instance_uses_scene_probs=True),
    "scene_only": dict(top_k=1, num_groups=0, scene_top_k=2, instance_router=False),
    "token_level_k3": dict(top_k=3, num_groups=1, scene_top_k=1),
}


def make_block(dims=(DIM, 32, DIM), activate_output=False, shared_dims=None, seed=0, **settings):
    config = MoEConfig(**{**dict(num_experts=8, top_k=2, num_groups=4, scene_top_k=2), **settings})
    torch.manual_seed(seed)
    block = MoEBlock(HierarchicalRouter(config, SCENE_DIM, dims[0]), dims, activate_output,
                     shared_dims=shared_dims)
    with torch.no_grad():  # distinct biases: every expert leaves its own mark on the output
        for bias in block.moe.experts.biases:
            bias.normal_()
    return block.eval()


class BlockOutputs(nn.Module):
    """Tensors only (what tracers and exporters take): outputs, experts, combine weights."""

    def __init__(self, block: MoEBlock):
        super().__init__()
        self.block = block

    def forward(self, x, scene, image_index):
        y, routing = self.block(x, scene, image_index)
        return y, routing.expert_index, routing.combine_weight


def sample(per_image, images, seed, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(per_image * images, dim, generator=g)
    scene = torch.randn(images, SCENE_DIM, generator=g) * 3
    return x, scene, torch.arange(images).repeat_interleave(per_image)


def assert_same(eager, exported, atol=1e-5):
    y, experts, weights = eager
    torch.testing.assert_close(exported[0], y, atol=atol, rtol=0)
    assert torch.equal(exported[1], experts)
    torch.testing.assert_close(exported[2], weights, atol=atol, rtol=0)


def trace(module, inputs):
    return torch.jit.trace(module, inputs, check_trace=False)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_traced_block_equals_eager_on_inputs_it_was_not_traced_on(variant):
    model = BlockOutputs(make_block(**VARIANTS[variant]))
    traced = trace(model, sample(20, 3, seed=1))
    experts_seen = set()
    with torch.no_grad():
        for seed, (per_image, images) in enumerate(SAMPLES):
            inputs = sample(per_image, images, seed=10 + seed)
            eager = model(*inputs)
            assert_same(eager, traced(*inputs))
            experts_seen |= set(eager[1].flatten().tolist())
    assert len(experts_seen) > 2  # the samples route differently from each other


@pytest.mark.parametrize("activate_output", [True, False])
def test_split_and_multi_layer_experts_with_a_wider_shared_expert(activate_output):
    """Split-upcycled DETR FFN (narrow experts next to the whole dense FFN as shared expert) and
    box-head experts (fc6+fc7, ReLU on the output)."""
    block = make_block(dims=(DIM, 4, 8, DIM), activate_output=activate_output,
                       shared_dims=(DIM, 64, DIM), shared_expert=True, shared_expert_weight=0.3)
    model = BlockOutputs(block)
    traced = trace(model, sample(20, 3, seed=1))
    with torch.no_grad():
        for seed, (per_image, images) in enumerate(SAMPLES):
            inputs = sample(per_image, images, seed=20 + seed)
            assert_same(model(*inputs), traced(*inputs))


def force_expert(block: MoEBlock, expert: int):
    """Scene-router bias that makes ``expert`` the only eligible one of every image (one group
    per expert, one group kept), so that every instance goes to it."""
    with torch.no_grad():
        block.router.scene_router.bias.zero_()
        block.router.scene_router.bias[expert] = 1e4


def single_group_block():
    return make_block(top_k=1, num_groups=0, scene_top_k=1)


def test_every_expert_is_reachable_in_a_graph_traced_on_a_sample_that_used_one():
    block = single_group_block()
    model = BlockOutputs(block)
    force_expert(block, 0)
    traced = trace(model, sample(20, 3, seed=1))  # the sample runs expert 0 only
    inputs = sample(9, 2, seed=3)
    with torch.no_grad():
        for expert in range(8):
            force_expert(block, expert)  # the traced module shares the block's parameters
            eager = model(*inputs)
            assert (eager[1] == expert).all()
            assert_same(eager, traced(*inputs))


def export_onnx(model, inputs) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(
        model, inputs, buffer, dynamo=False, opset_version=17,
        input_names=["x", "scene", "image_index"], output_names=["y", "experts", "weights"],
        dynamic_axes={"x": {0: "n"}, "scene": {0: "b"}, "image_index": {0: "n"},
                      "y": {0: "n"}, "experts": {0: "n"}, "weights": {0: "n"}},
    )
    return buffer.getvalue()


def run_onnx(session, inputs):
    x, scene, image_index = inputs
    outputs = session.run(None, {"x": x.numpy(), "scene": scene.numpy(), "image_index": image_index.numpy()})
    return [torch.from_numpy(np.asarray(o)) for o in outputs]


@pytest.mark.parametrize("variant", ["k1", "k2_shared"])
def test_onnx_runtime_runs_the_exported_block_like_eager(variant):
    model = BlockOutputs(make_block(**VARIANTS[variant]))
    session = ort.InferenceSession(export_onnx(model, sample(20, 3, seed=1)), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for seed, (per_image, images) in enumerate(SAMPLES):
            inputs = sample(per_image, images, seed=30 + seed)
            assert_same(model(*inputs), run_onnx(session, inputs))


def test_every_expert_is_reachable_in_onnx_exported_on_a_sample_that_used_one():
    """Exported while the router sends everything to expert 0; then the scene-router bias
    stored in the file is rewritten to force each expert in turn."""
    block = single_group_block()
    model = BlockOutputs(block)
    force_expert(block, 0)
    proto = onnx.load_from_string(export_onnx(model, sample(20, 3, seed=1)))
    name = "block.router.scene_router.bias"
    (stored,) = [init for init in proto.graph.initializer if init.name == name]
    inputs = sample(9, 2, seed=3)
    with torch.no_grad():
        for expert in range(8):
            force_expert(block, expert)
            stored.CopyFrom(onnx.numpy_helper.from_array(block.router.scene_router.bias.numpy(), name))
            session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            eager = model(*inputs)
            assert (eager[1] == expert).all()
            assert_same(eager, run_onnx(session, inputs))


def test_dynamo_onnx_export_runs_like_eager():
    model = BlockOutputs(make_block(top_k=2, shared_expert=True))
    n, b = torch.export.Dim("n", min=1), torch.export.Dim("b", min=1)
    program = torch.onnx.export(model, sample(20, 3, seed=1), dynamo=True, verbose=False,
                                input_names=["x", "scene", "image_index"],
                                dynamic_shapes=({0: n}, {0: b}, {0: n}))
    buffer = io.BytesIO()
    program.save(buffer)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for seed, (per_image, images) in enumerate(SAMPLES[:3]):
            inputs = sample(per_image, images, seed=40 + seed)
            assert_same(model(*inputs), run_onnx(session, inputs))


def test_an_image_alone_gets_what_it_gets_in_a_batch_exports_are_dropless():
    """With an inference capacity limit (``eval_capacity_factor``), eager inference drops
    assignments depending on the batch; the exported block is dropless: an image alone and in a
    batch get the same outputs, those of the eager block without a capacity limit."""
    limited = BlockOutputs(make_block(top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5))
    dropless = BlockOutputs(make_block(top_k=2))
    traced = trace(limited, sample(20, 3, seed=1))
    x, scene, image_index = sample(15, 4, seed=5)
    with torch.no_grad():
        batched = traced(x, scene, image_index)
        assert_same(dropless(x, scene, image_index), batched)
        assert not torch.allclose(limited(x, scene, image_index)[0], batched[0], atol=1e-3)
        for image in range(4):
            rows = image_index == image
            alone = traced(x[rows], scene[image:image + 1], torch.zeros(int(rows.sum()), dtype=torch.long))
            torch.testing.assert_close(alone[0], batched[0][rows], atol=1e-5, rtol=0)
            assert torch.equal(alone[1], batched[1][rows])


def test_exported_graph_has_no_host_sizes_losses_or_statistics():
    block = make_block(top_k=2).train()
    captured = {}

    class Capture(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x, scene, image_index):
            y, routing = self.block(x, scene, image_index)
            captured["routing"], captured["exporting"] = routing, exporting()
            return y

    graph = str(trace(Capture(), sample(20, 3, seed=1)).inlined_graph)
    routing = captured["routing"]
    assert captured["exporting"] and isinstance(routing.plan, ExportDispatchPlan)
    assert routing.losses == {} and routing.statistics == {}
    assert block.statistics.steps == 0
    for op in ("aten::sort", "aten::argsort", "aten::bincount", "aten::split_with_sizes"):
        assert op not in graph
    assert graph.count("aten::nonzero") == 8  # one per expert


def test_cascade_stages_reuse_the_routing_under_export():
    """A later block given the earlier block's routing (cascade route once), also restricted
    to some rows (``Routing.select``)."""
    class Stages(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = make_block(top_k=2, seed=0), make_block(top_k=2, seed=1)

        def forward(self, x, scene, image_index):
            y0, routing = self.first(x, scene, image_index)
            y1, _ = self.second(x, None, image_index, routing=routing)
            rows = torch.nonzero(y0[:, 0] > 0).squeeze(1)
            y2, _ = self.second(x.index_select(0, rows), None, image_index, routing=routing.select(rows))
            return y0, y1, y2

    stages = Stages().eval()
    traced = trace(stages, sample(20, 3, seed=1))
    with torch.no_grad():
        for seed, (per_image, images) in enumerate(SAMPLES):
            inputs = sample(per_image, images, seed=50 + seed)
            for eager, exported in zip(stages(*inputs), traced(*inputs)):
                torch.testing.assert_close(exported, eager, atol=1e-5, rtol=0)


def test_scene_pooling_masks_each_images_padding_under_export():
    """The scene descriptor of a traced detector: image sizes are tensors there (Detectron2
    tracing), and each image's valid area must follow them, not the traced sample's."""
    strides = [4, 8]

    def pool(p2, p3, sizes):
        return masked_mean_pool([p2, p3], strides, [size for size in sizes])

    def padded(sizes, seed):
        g = torch.Generator().manual_seed(seed)
        height, width = (int(sizes[:, 0].max()) + 31) // 32 * 32, (int(sizes[:, 1].max()) + 31) // 32 * 32
        return (torch.randn(len(sizes), 5, height // 4, width // 4, generator=g),
                torch.randn(len(sizes), 5, height // 8, width // 8, generator=g))

    sizes_a = torch.tensor([[64, 96], [50, 70]])
    traced = torch.jit.trace(pool, (*padded(sizes_a, 0), sizes_a), check_trace=False)
    for seed, sizes in enumerate([torch.tensor([[33, 47], [64, 20]]), torch.tensor([[100, 30], [7, 9]])]):
        maps = padded(sizes, seed + 1)
        eager = masked_mean_pool(list(maps), strides, [tuple(int(v) for v in size) for size in sizes])
        torch.testing.assert_close(traced(*maps, sizes), eager, atol=1e-5, rtol=0)
