"""Exported HI-MoE Detectron2 detectors (TracingAdapter, tools/deploy/export_model.py) give the
eager detections, with the same experts, on images they were not traced on."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from torch import nn

from ..detectron2.d2_helpers import CONFIGS, HIMOE_YAML, REPO_ROOT, SMALL_OPTS, small_cfg

from himoe_plugin.detectron2 import register_bundled_datasets  # noqa: E402

MASK_YAML = CONFIGS / "coco128" / "himoe_mask_rcnn_R_18_FPN_coco128.yaml"
LAZY_CONFIG = CONFIGS / "aquarium" / "himoe_faster_rcnn_R_18_FPN_aquarium.py"
EXPORT_TOOL = REPO_ROOT / "tools" / "deploy" / "export_model.py"
#: Narrower experts than the configs' (fc 1024) keep the exported files small in tests.
TEST_OPTS = ["MODEL.ROI_BOX_HEAD.FC_DIM", "256", "MODEL.RPN.POST_NMS_TOPK_TEST", "300"]
LAZY_TEST_OPTS = ["model.proposal_generator.post_nms_topk=[500,300]"]


def resized_images(cfg, folder: Path, count: int):
    """Test-time resized (3, H, W) images of ``folder``, one per distinct resized size, plus a
    rescaled and a cropped one (sizes no image of the folder has)."""
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    by_size = {}
    for path in sorted(folder.glob("*.jpg")):
        image = detection_utils.read_image(str(path), format=cfg.INPUT.FORMAT)
        image = torch.as_tensor(resize.get_transform(image).apply_image(image).astype("float32").transpose(2, 0, 1))
        by_size.setdefault(tuple(image.shape), image)
        if len(by_size) == count - 2:
            break
    images = list(by_size.values())
    images.append(nn.functional.interpolate(images[0][None], size=(300, 224), mode="bilinear")[0])
    images.append(images[-2][:, :200, :250].contiguous())
    return images


def calibrate_batch_norm(model: nn.Module, images) -> None:
    """Running statistics of every BatchNorm from ``images`` (precise BN). A randomly initialised
    R18 keeps unit statistics and saturates its class scores at 1.0, where every detection ties
    with many others; calibrated, scores spread and a detection is identifiable by its score."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    with torch.no_grad():
        for image in images:
            model.inference([{"image": image}], do_postprocess=False)
    for norm in norms:
        norm.eval()


def unpostprocessed(model, inputs):
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def unmatched_detections(expected, actual, atol=1e-4) -> int:
    """Detections of ``expected`` without a one-to-one partner in ``actual``: same label (and
    experts, masks), box and score within ``atol``. The order of equal scores is free."""
    taken = torch.zeros(len(actual), dtype=torch.bool)
    missing = abs(len(expected) - len(actual))
    for i in range(len(expected)):
        same = (~taken & (actual.pred_classes == expected.pred_classes[i])
                & ((actual.scores - expected.scores[i]).abs() <= atol)
                & ((actual.pred_boxes.tensor - expected.pred_boxes.tensor[i]).abs().amax(dim=1) <= atol))
        for field in ("pred_experts", "pred_masks"):
            if expected.has(field):
                same &= (actual.get(field) - expected.get(field)[i]).flatten(1).abs().amax(dim=1) <= atol
        match = torch.nonzero(same)
        if len(match):
            taken[match[0, 0]] = True
        else:
            missing += 1
    return missing


@pytest.fixture(scope="module")
def data_root_registered(data_root):
    register_bundled_datasets(str(data_root))
    return data_root


@pytest.mark.slow
@pytest.mark.parametrize("config", ["faster", "mask"])
def test_traced_detector_gives_eager_detections_and_experts_on_other_images(data_root_registered, tmp_path, config):
    yaml, folder = {"faster": (HIMOE_YAML, "aquarium/images/valid"), "mask": (MASK_YAML, "coco128/images")}[config]
    cfg = small_cfg(tmp_path, yaml=yaml, extra=TEST_OPTS + ["MODEL.HIMOE.OUTPUT_ROUTING", "True"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = resized_images(cfg, data_root_registered / folder, count=6)
    assert len({tuple(image.shape) for image in images}) == 6
    calibrate_batch_norm(model, images[:2])
    adapter = TracingAdapter(model, [{"image": images[0]}], unpostprocessed).eval()
    with torch.no_grad():
        traced = torch.jit.trace(adapter, (images[0],), check_trace=False)
        usage = []
        for image in images:
            eager = adapter.outputs_schema(adapter(image))[0]["instances"]
            exported = adapter.outputs_schema(traced(image))[0]["instances"]
            assert len(eager) > 10
            assert unmatched_detections(eager, exported) == 0
            torch.testing.assert_close(exported.scores, eager.scores, atol=1e-4, rtol=0)
            usage.append(torch.bincount(eager.pred_experts.flatten(), minlength=8))
    # The images are routed differently from the one the model was traced on.
    assert any(not torch.equal(u, usage[0]) for u in usage[1:])


def pseudo_ground_truth(model, data_root: Path, out_json: Path, per_image: int = 5) -> Path:
    """An 8-image Aquarium valid slice (2 images of each size) whose annotations are ``model``'s
    own top detections: its COCO AP is far from 0, and any exported detection that moves
    changes it."""
    full = json.loads((data_root / "aquarium/annotations/instances_valid.json").read_text())
    by_size = {}
    for image in sorted(full["images"], key=lambda im: im["id"]):
        by_size.setdefault((image["width"], image["height"]), []).append(image)
    images = [image for group in by_size.values() for image in group[:2]]
    dataset_id = sorted(c["id"] for c in full["categories"])  # Detectron2's contiguous class order
    cfg = small_cfg(out_json.parent, extra=TEST_OPTS)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    annotations = []
    with torch.no_grad():
        for image in images:
            pixels = detection_utils.read_image(str(data_root / "aquarium/images/valid" / image["file_name"]), "BGR")
            resized = torch.as_tensor(resize.get_transform(pixels).apply_image(pixels).astype("float32").transpose(2, 0, 1))
            found = model.inference([{"image": resized}], do_postprocess=False)[0]
            found = detector_postprocess(found, image["height"], image["width"])[:per_image]
            for box, label in zip(found.pred_boxes.tensor.tolist(), found.pred_classes.tolist()):
                x0, y0, x1, y1 = box
                annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "iscrowd": 0,
                                    "category_id": dataset_id[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0)})
    out_json.write_text(json.dumps(dict(full, images=images, annotations=annotations)))
    return out_json


@pytest.fixture(scope="module")
def calibrated_checkpoint(data_root_registered, tmp_path_factory):
    """A random-init HI-MoE Faster R-CNN (narrow experts, calibrated BN), its weights file and an
    8-image dataset of its own detections (``deploy_slice8``)."""
    folder = tmp_path_factory.mktemp("deploy")
    cfg = small_cfg(folder, extra=TEST_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calibrate_batch_norm(model, resized_images(cfg, data_root_registered / "aquarium/images/valid", count=6))
    weights = folder / "model.pth"
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    slice_json = pseudo_ground_truth(model, data_root_registered, folder / "deploy_slice8.json")
    return {"weights": weights, "model": model, "cfg": cfg,
            "register": ["--register", "deploy_slice8", str(slice_json),
                         str(data_root_registered / "aquarium/images/valid")]}


def run_tool(args):
    run = subprocess.run([sys.executable, str(EXPORT_TOOL), *args], capture_output=True, text=True, timeout=1200)
    return run.returncode, run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_export_tool_run_eval_gets_the_eager_ap(calibrated_checkpoint, data_root_registered, tmp_path, export_format):
    """The CLI end to end: export (TorchScript, or ONNX run by ONNX Runtime) and --run-eval on
    8 images of 4 sizes: the exported model's COCO AP equals the eager model's, detection by
    detection."""
    code, log = run_tool([
        "--format", export_format, "--export-method", "tracing", "--run-eval", "--output", str(tmp_path),
        "--config-file", str(HIMOE_YAML), "--data-root", str(data_root_registered),
        *calibrated_checkpoint["register"],
        *SMALL_OPTS, *TEST_OPTS, "MODEL.WEIGHTS", str(calibrated_checkpoint["weights"]),
        "DATASETS.TEST", "('deploy_slice8',)", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05",
    ])
    assert code == 0, log[-4000:]
    assert (tmp_path / ("model.ts" if export_format == "torchscript" else "model.onnx")).is_file()
    exported, eager = map(float, re.search(r"bbox AP: exported ([\d.]+), eager ([\d.]+)", log).groups())
    assert exported == eager and eager > 30.0
    equal, total, unmatched = map(int, re.search(
        r"detections on 8 images: (\d+) of (\d+) equal .*?, (\d+) unmatched", log).groups())
    assert equal == total > 40 and unmatched == 0


@pytest.mark.slow
def test_export_tool_traces_a_lazyconfig_model(data_root_registered, tmp_path):
    """A LazyConfig (.py) model, weights from ``train.init_checkpoint``: the written TorchScript
    file gives the eager detections on an image of another size than its sample."""
    lazy = LazyConfig.apply_overrides(LazyConfig.load(str(LAZY_CONFIG)), LAZY_TEST_OPTS)
    torch.manual_seed(0)
    model = instantiate(lazy.model).eval()
    images = resized_images(small_cfg(tmp_path), data_root_registered / "aquarium/images/valid", count=6)
    calibrate_batch_norm(model, images[:2])
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("lazy_model")
    sample = sorted((data_root_registered / "aquarium/images/valid").glob("*.jpg"))[0]
    code, log = run_tool([
        "--config-file", str(LAZY_CONFIG), "--output", str(tmp_path), "--sample-image", str(sample),
        f"train.init_checkpoint={tmp_path / 'lazy_model.pth'}", *LAZY_TEST_OPTS,
    ])
    assert code == 0, log[-4000:]
    traced = torch.jit.load(str(tmp_path / "model.ts"))
    adapter = TracingAdapter(model, [{"image": images[2]}], unpostprocessed).eval()
    with torch.no_grad():
        for image in images[2:4]:  # sizes other than the sample's (341x256)
            flat = adapter(image)  # (sets the adapter's outputs schema)
            eager = adapter.outputs_schema(flat)[0]["instances"]
            exported = adapter.outputs_schema(traced(image))[0]["instances"]
            assert len(eager) > 10 and unmatched_detections(eager, exported) == 0


def test_export_tool_scripting_names_the_moe_layer(data_root_registered, tmp_path):
    code, log = run_tool([
        "--export-method", "scripting", "--config-file", str(HIMOE_YAML), "--output", str(tmp_path),
        "--data-root", str(data_root_registered), "MODEL.DEVICE", "cpu", *TEST_OPTS,
    ])
    assert code != 0
    assert "'roi_heads.box_head.moe_block' (MoEBlock) cannot be scripted" in log
    assert "--export-method tracing" in log
