"""The CUDA path: grouped GEMM, autocast, NCCL and device-independent routing (marker ``cuda``)."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist

from himoe_plugin.core import (
    HierarchicalRouter,
    MoEBlock,
    MoEConfig,
    StackedMLPExperts,
    build_dispatch_plan,
)

pytestmark = pytest.mark.cuda

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIMOE_YAML = os.path.join(REPO_ROOT, "configs/detectron2/aquarium/himoe_faster_rcnn_R_18_FPN_aquarium.yaml")
NUM_EXPERTS, IDLE_EXPERT = 8, 3
DIMS = [256, 1024, 1024]  # a box head's fc layers at FPN width 256 (multiples of 8: grouped-GEMM ready)


def has_grouped_kernel(device: torch.device) -> bool:
    """CUDA sm90 / sm100: torch's grouped GEMM is one CUTLASS kernel there (bfloat16)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def routed_rows(device, n=1000, seed=0):
    """A top-2 dispatch plan over ``n`` rows in which ``IDLE_EXPERT`` gets nothing."""
    g = torch.Generator().manual_seed(seed)
    busy = torch.tensor([e for e in range(NUM_EXPERTS) if e != IDLE_EXPERT])
    first = busy[torch.randint(0, len(busy), (n,), generator=g)]
    # another busy expert: 1 to len(busy)-1 places after the first one, cyclically
    second = busy[(torch.searchsorted(busy, first) + 1 + torch.randint(0, len(busy) - 1, (n,), generator=g)) % len(busy)]
    expert_index = torch.stack([first, second], dim=1).to(device)
    weights = torch.rand(n, 2, generator=g).softmax(dim=1).to(device)
    plan = build_dispatch_plan(expert_index, weights, weights, NUM_EXPERTS, 0)
    assert plan.rows_per_expert[IDLE_EXPERT] == 0
    return plan


def run_experts(experts, x, upstream, plan, device, dtype):
    """Output and gradients (input, then every parameter) under autocast to ``dtype`` (None: off)."""
    x = x.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = experts(x, plan)
    (out.float() * upstream).sum().backward()
    return out, [x.grad] + [p.grad for p in experts.parameters()]


def test_grouped_gemm_equals_loop_in_bfloat16_forward_and_backward(device, grouped_mm_calls):
    torch.manual_seed(0)
    reference = StackedMLPExperts(NUM_EXPERTS, DIMS, expert_backend="loop").to(device)
    loop = StackedMLPExperts(NUM_EXPERTS, DIMS, expert_backend="loop").to(device)
    grouped = StackedMLPExperts(NUM_EXPERTS, DIMS, expert_backend="grouped_mm").to(device)
    loop.load_state_dict(reference.state_dict())
    grouped.load_state_dict(reference.state_dict())
    plan = routed_rows(device, n=1000 if device.type == "cuda" else 256)
    x = torch.randn(plan.num_instances, DIMS[0], device=device)
    upstream = torch.randn(plan.num_instances, DIMS[-1], device=device)

    out_ref, grads_ref = run_experts(reference, x, upstream, plan, device, None)  # float32
    out_loop, grads_loop = run_experts(loop, x, upstream, plan, device, torch.bfloat16)
    assert grouped_mm_calls == []
    out_grouped, grads_grouped = run_experts(grouped, x, upstream, plan, device, torch.bfloat16)
    assert len(grouped_mm_calls) == 3 * (len(DIMS) - 1)  # forward, input and weight gradients per layer

    # Both backends round to bfloat16 alike: the grouped GEMM is as close to float32 as the loop.
    assert out_grouped.dtype == out_loop.dtype == torch.bfloat16
    pairs = [(out_grouped, out_loop, out_ref)] + list(zip(grads_grouped, grads_loop, grads_ref))
    for grouped_value, loop_value, ref_value in pairs:
        assert torch.isfinite(grouped_value.float()).all()
        error_grouped, error_loop = relative_error(grouped_value, ref_value), relative_error(loop_value, ref_value)
        assert error_grouped < 0.1 and error_grouped <= 1.25 * error_loop + 5e-3, (error_grouped, error_loop)
    for param in grouped.parameters():  # (E, ...) stacked: the idle expert's slice is exactly zero
        assert param.grad[IDLE_EXPERT].abs().max().item() == 0.0
        assert param.grad[IDLE_EXPERT - 1].abs().max().item() > 0.0


def test_auto_backend_uses_the_grouped_kernel_where_it_is_one(device, grouped_mm_calls):
    torch.manual_seed(0)
    experts = StackedMLPExperts(NUM_EXPERTS, DIMS, expert_backend="auto").to(device)
    plan = routed_rows(device, n=1000 if device.type == "cuda" else 256)
    x = torch.randn(plan.num_instances, DIMS[0], device=device)
    upstream = torch.randn(plan.num_instances, DIMS[-1], device=device)

    run_experts(experts, x, upstream, plan, device, torch.bfloat16)
    expected = 3 * (len(DIMS) - 1) if has_grouped_kernel(device) else 0
    assert len(grouped_mm_calls) == expected, (device, torch.cuda.is_available() and torch.cuda.get_device_name())
    grouped_mm_calls.clear()
    with torch.no_grad():  # float32: the loop everywhere (the CUDA fast path is bfloat16 only)
        experts(x, plan)
    assert grouped_mm_calls == []


def test_detectron2_himoe_training_step_under_autocast(device, aquarium_root):
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from himoe_plugin.detectron2 import get_himoe_cfg, register_coco_dataset

    cfg = get_himoe_cfg()
    cfg.merge_from_file(HIMOE_YAML)
    cuda = device.type == "cuda"
    # On CPU (the dry run) smaller and in float32: CPU autocast convolutions take minutes here.
    cfg.merge_from_list(["MODEL.DEVICE", str(device), "INPUT.MIN_SIZE_TRAIN", "(256,)" if cuda else "(128,)",
                         "INPUT.MAX_SIZE_TRAIN", "427" if cuda else "213"])
    register_coco_dataset("cuda_tests_aquarium_train", str(aquarium_root / "annotations/instances_train.json"),
                          str(aquarium_root / "images/train"))
    dicts = [d for d in DatasetCatalog.get("cuda_tests_aquarium_train") if d["annotations"]][:2]
    batch = [DatasetMapper(cfg, is_train=True)(d) for d in dicts]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert blocks, "the HI-MoE config built no MoEBlock"
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda module, inputs, output: seen.append(output))
    amp_dtype = torch.float16 if cuda else torch.float32  # float16: what Detectron2's AMPTrainer uses
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)

    with EventStorage(0):
        for _ in range(2 if cuda else 1):
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                losses = model(batch)
            assert any(name.startswith("loss_moe") for name in losses), sorted(losses)
            for name, value in losses.items():
                assert torch.isfinite(value).all(), (name, value)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()
    for out, routing in seen:
        assert out.dtype == amp_dtype  # the experts ran in the autocast dtype ...
        assert routing.instance_probs.dtype == routing.scene_probs.dtype == torch.float32  # ... the router did not
        assert torch.isfinite(routing.instance_probs).all()
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_ddp_steps_with_idle_experts(device):
    """NCCL (gloo on CPU), DDP without find_unused_parameters: experts without rows every step."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        # One image keeps 1 of 4 groups: 6 of the 8 experts are idle in every step.
        config = MoEConfig(num_experts=8, top_k=1, num_groups=4, scene_top_k=1)
        block = MoEBlock(HierarchicalRouter(config, scene_dim=32, instance_dim=64), dims=[64, 128, 64]).to(device)
        model = torch.nn.parallel.DistributedDataParallel(
            block, device_ids=[device.index or 0] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        expert_weights = {n: p for n, p in block.named_parameters() if ".experts." in n}
        for _ in range(3):
            x, scene = torch.randn(6, 64, device=device), torch.randn(1, 32, device=device)
            before = {n: p.detach().clone() for n, p in expert_weights.items()}
            out, routing = model(x, scene, torch.zeros(6, dtype=torch.long, device=device))
            loss = out.float().pow(2).mean() + sum(routing.losses.values())
            assert torch.isfinite(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            idle = [e for e, rows in enumerate(routing.plan.rows_per_expert) if rows == 0]
            busy = [e for e, rows in enumerate(routing.plan.rows_per_expert) if rows > 0]
            assert len(idle) >= 6 and routing.statistics["unused_experts"].item() == len(idle)
            for name, param in expert_weights.items():
                assert param.grad[idle].abs().max().item() == 0.0, name
                torch.testing.assert_close(param.detach()[idle], before[name][idle], rtol=0, atol=0)
                assert not torch.equal(param.detach()[busy], before[name][busy]), name
    finally:
        dist.destroy_process_group()


def confident_rows(probs: torch.Tensor, k: int, margin: float) -> torch.Tensor:
    """Rows whose k best values are separated from each other and from the rest by > ``margin``."""
    top = probs.topk(k + 1, dim=-1).values
    return (top[:, :-1] - top[:, 1:]).min(dim=-1).values > margin


def test_routing_is_the_same_on_cpu_and_on_the_device(device):
    torch.manual_seed(0)
    config = MoEConfig(num_experts=8, top_k=2, num_groups=4, scene_top_k=2)
    router = HierarchicalRouter(config, scene_dim=256, instance_dim=1024).eval()
    num_images, n = 8, 4000
    scene, x = torch.randn(num_images, 256), torch.randn(n, 1024)
    image_index = torch.arange(n) * num_images // n
    with torch.no_grad():
        reference = router(scene, x, image_index)
        on_device = copy.deepcopy(router).to(device)
        # The router runs in float32 also under autocast: same routing as CPU float32.
        with torch.autocast(device.type, dtype=torch.bfloat16):
            routing = on_device(scene.to(device), x.to(device), image_index.to(device))

    assert routing.instance_probs.dtype == torch.float32
    scenes = confident_rows(reference.scene_probs, config.scene_top_k, 1e-5)
    assert scenes.all()
    torch.testing.assert_close(routing.scene_groups.cpu(), reference.scene_groups, rtol=0, atol=0)
    rows = confident_rows(reference.instance_probs, config.top_k, 1e-5)
    assert rows.float().mean() > 0.99  # near-ties may legitimately flip between devices
    torch.testing.assert_close(routing.expert_index.cpu()[rows], reference.expert_index[rows], rtol=0, atol=0)
    torch.testing.assert_close(routing.combine_weight.cpu()[rows], reference.combine_weight[rows],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(routing.instance_probs.cpu(), reference.instance_probs, rtol=1e-4, atol=1e-5)
