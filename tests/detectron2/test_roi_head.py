"""InstanceMoEROIHead on edge cases: empty images, padding, super-class supervision."""
import pytest
import torch
from .d2_helpers import small_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from himoe_plugin.core import LOSS_SCENE_SUPERVISION

IMAGE_SIZES = [(224, 300), (256, 180)]  # padded to 256 x 320 (size divisibility 32)


def make_inputs(model, num_proposals, num_gt, seed=0):
    """Features of two padded images, random proposals and ground truth per image."""
    g = torch.Generator().manual_seed(seed)
    images = ImageList(torch.zeros(2, 3, 256, 320), IMAGE_SIZES)
    features = {
        name: torch.randn(2, 256, 256 // s, 320 // s, generator=g)
        for name, s in zip(["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64])
    }
    proposals, targets = [], []
    for (h, w), n, m in zip(IMAGE_SIZES, num_proposals, num_gt):
        p = Instances((h, w))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        p.proposal_boxes = Boxes(torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * 60], 1))
        p.objectness_logits = torch.randn(n, generator=g)
        proposals.append(p)
        t = Instances((h, w))
        xy = torch.rand(m, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        t.gt_boxes = Boxes(torch.cat([xy, xy + 40], 1))
        t.gt_classes = torch.randint(0, 7, (m,), generator=g)
        targets.append(t)
    return images, features, proposals, targets


@pytest.fixture
def model(registered, tmp_path):
    torch.manual_seed(0)
    return build_model(small_cfg(tmp_path))


@pytest.mark.parametrize("num_proposals, num_gt", [([0, 40], [0, 3]), ([0, 0], [0, 0]), ([30, 0], [2, 0])])
def test_training_with_empty_images(model, num_proposals, num_gt):
    images, features, proposals, targets = make_inputs(model, num_proposals, num_gt)
    heads = model.roi_heads.train()
    with EventStorage(0):
        _, losses = heads(images, features, proposals, targets)
    assert {"loss_cls", "loss_box_reg", "loss_moe_balance", "loss_moe_z"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, param in heads.named_parameters():
        assert param.grad is not None, name  # nothing drops out of the graph (DDP-safe)
        assert torch.isfinite(param.grad).all(), name


def test_inference_with_an_image_without_proposals(model):
    images, features, proposals, _ = make_inputs(model, [0, 25], [0, 0])
    heads = model.roi_heads.eval()
    with torch.no_grad():
        results, losses = heads(images, features, proposals)
    assert losses == {}
    assert len(results[0]) == 0 and len(results[1]) > 0
    for result in results:
        assert set(result.get_fields()) == {"pred_boxes", "scores", "pred_classes"}


def capture_routing(heads):
    captured = []
    handle = heads.box_head.moe_block.router.register_forward_hook(lambda m, i, o: captured.append((i, o)))
    return captured, handle


def test_routing_sees_only_real_rois_and_unpadded_pixels(model):
    heads = model.roi_heads.train()
    images, features, proposals, targets = make_inputs(model, [17, 40], [2, 3])
    captured, handle = capture_routing(heads)
    with EventStorage(0):
        sampled, _ = heads(images, features, proposals, targets)
        _, instances, image_index = captured[-1][0][:3]
        assert instances.shape[0] == sum(len(p) for p in sampled)
        assert torch.equal(image_index.bincount(minlength=2), torch.tensor([len(p) for p in sampled]))

        # Garbage in the padded area of every feature map changes nothing in the routing.
        heads.eval()
        with torch.no_grad():
            heads(images, features, proposals)
            clean = captured[-1][1]
            for name, stride in zip(["p2", "p3", "p4", "p5"], [4, 8, 16, 32]):
                for b, (h, w) in enumerate(IMAGE_SIZES):
                    valid_h, valid_w = -(-h // stride), -(-w // stride)
                    features[name][b, :, valid_h:, :] = 1e4
                    features[name][b, :, :, valid_w:] = -1e4
            heads(images, features, proposals)
            padded = captured[-1][1]
    handle.remove()
    assert torch.equal(clean.scene_probs, padded.scene_probs)
    assert torch.equal(clean.expert_index, padded.expert_index)


def test_scene_router_supervised_by_supercategories(registered, tmp_path):
    cfg = small_cfg(tmp_path, extra=[
        "MODEL.HIMOE.NUM_EXPERTS", "6", "MODEL.HIMOE.NUM_GROUPS", "3", "MODEL.HIMOE.SCENE_TOP_K", "2",
        "MODEL.HIMOE.SCENE_SUPERVISION_WEIGHT", "0.5",
    ])
    heads = build_model(cfg).roi_heads.train()
    # aquarium classes: fish, jellyfish, penguin, puffin, shark, starfish, stingray;
    # sorted supercategories: bird=0, fish-like=1, invertebrate=2
    assert heads.class_to_group.tolist() == [1, 2, 0, 0, 1, 2, 1]
    images, features, proposals, targets = make_inputs(heads, [20, 20], [3, 0])
    targets[0].gt_classes = torch.tensor([2, 3, 5])  # penguin, puffin, starfish
    captured, handle = capture_routing(heads)
    with EventStorage(0):
        _, losses = heads(images, features, proposals, targets)
    handle.remove()
    scene_probs = captured[-1][1].scene_probs
    # Image 0: target (bird 2/3, invertebrate 1/3); image 1 has no ground truth: no loss.
    expected = -(2 / 3 * scene_probs[0, 0].log() + 1 / 3 * scene_probs[0, 2].log())
    torch.testing.assert_close(losses[LOSS_SCENE_SUPERVISION], 0.5 * expected)
    losses[LOSS_SCENE_SUPERVISION].backward()
    assert heads.box_head.moe_block.router.scene_router.weight.grad.abs().sum() > 0


def test_inference_is_dropless_by_default_so_an_image_does_not_depend_on_its_batch(registered, tmp_path):
    """CAPACITY_FACTOR caps the experts' load in training only: alone or next to another image,
    an image gets the same routing and detections (EVAL_CAPACITY_FACTOR > 0 asks for a cap)."""
    def detections(eval_capacity_factor, images_in_batch):
        cfg = small_cfg(tmp_path, extra=["MODEL.HIMOE.CAPACITY_FACTOR", "0.5",
                                         "MODEL.HIMOE.EVAL_CAPACITY_FACTOR", str(eval_capacity_factor),
                                         "MODEL.HIMOE.OUTPUT_ROUTING", "True"])
        torch.manual_seed(0)
        heads = build_model(cfg).roi_heads.eval()
        images, features, proposals, _ = make_inputs(heads, [60, 60], [0, 0])
        if images_in_batch == 1:
            images = ImageList(images.tensor[1:], images.image_sizes[1:])
            features = {k: v[1:] for k, v in features.items()}
            proposals = proposals[1:]
        with torch.no_grad():
            return heads(images, features, proposals)[0][-1]

    alone, batched = detections(0.0, 1), detections(0.0, 2)
    assert len(alone) > 0
    for field in ("scores", "pred_classes", "pred_experts", "pred_expert_weights"):
        torch.testing.assert_close(alone.get(field), batched.get(field))
    capped_alone, capped_batched = detections(0.5, 1), detections(0.5, 2)
    assert (capped_alone.pred_expert_weights == 0).any()  # asked for: the cap drops assignments
    assert not torch.equal(capped_alone.pred_expert_weights, capped_batched.pred_expert_weights)
