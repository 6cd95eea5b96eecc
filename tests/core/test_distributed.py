"""Global load balancing over 2 gloo ranks with uneven instance counts."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from himoe_plugin.core import LOSS_BALANCE, LOSS_SCENE_BALANCE, LOSS_Z, HierarchicalRouter, MoEConfig, weighted_losses

CONFIG = MoEConfig(num_experts=8, top_k=2, num_groups=4, scene_top_k=2, z_loss_weight=0.01)
PER_RANK_IMAGES = [(13, 0), (2, 40)]  # instances per image on rank 0 and rank 1: uneven, with empties


def make_inputs():
    g = torch.Generator().manual_seed(3)
    batches = []
    for counts in PER_RANK_IMAGES:
        n = sum(counts)
        batches.append(
            (
                torch.randn(len(counts), 6, generator=g),
                torch.randn(n, 10, generator=g),
                torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)),
            )
        )
    return batches


def make_router():
    torch.manual_seed(0)
    return HierarchicalRouter(CONFIG, 6, 10).train()


def aux_loss(routing):
    return sum(weighted_losses(routing.losses, CONFIG).values())


def worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    router = torch.nn.parallel.DistributedDataParallel(make_router())
    scene, x, image_index = make_inputs()[rank]
    routing = router(scene, x, image_index)
    aux_loss(routing).backward()
    torch.save(
        {
            "losses": {k: v.detach() for k, v in routing.losses.items()},
            "stats": routing.statistics,
            "grads": {n: p.grad for n, p in router.module.named_parameters()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_global_balance_equals_single_process_on_the_union(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # Reference: one process routing both ranks' batches at once (images concatenated).
    batches = make_inputs()
    scene = torch.cat([b[0] for b in batches])
    x = torch.cat([b[1] for b in batches])
    image_index = torch.cat([batches[0][2], batches[1][2] + 2])
    router = make_router()
    routing = router(scene, x, image_index)
    aux_loss(routing).backward()

    for name in (LOSS_BALANCE, LOSS_SCENE_BALANCE, LOSS_Z):
        for rank in ranks:
            torch.testing.assert_close(rank["losses"][name], routing.losses[name])
    for name, value in routing.statistics.items():
        for rank in ranks:
            torch.testing.assert_close(rank["stats"][name], value)
    # DDP averages gradients over ranks; global sums make that average the true gradient.
    for name, param in router.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name], param.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[1]["grads"][name], param.grad, rtol=1e-5, atol=1e-7)
