"""The GPU kit (tools/gpu/): compact data, bundle checks, and a CPU dry run of both scripts.

The dry run (``make_bundle.sh --tiny`` then ``run_checks.sh --device cpu --tiny``) keeps the kit
from rotting between the rare runs on a GPU: same stages, toy sizes, the CUDA tests' CPU
counterparts, nothing installed.
"""
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_TOOLS = REPO_ROOT / "tools" / "gpu"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, GPU_TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compact_dataset = load_tool("compact_dataset")
check_bundle = load_tool("check_bundle")


def test_compact_copy_rescales_images_and_labels(data_root, tmp_path):
    counts = compact_dataset.compact_data_root(data_root, tmp_path, short_side=160, quality=70, limit=3)
    assert set(counts) == {json_rel for json_rel, _ in compact_dataset.SPLITS}
    for json_rel, images_rel in compact_dataset.SPLITS:
        source = json.loads((data_root / json_rel).read_text())
        compact = json.loads((tmp_path / json_rel).read_text())
        assert compact["categories"] == source["categories"]
        assert compact["info"]["himoe_compact"]["short_side"] == 160
        source_images = {im["id"]: im for im in source["images"]}
        assert [im["id"] for im in compact["images"]] == sorted(source_images)[:3]
        for im in compact["images"]:
            with Image.open(tmp_path / images_rel / im["file_name"]) as pil:
                assert pil.size == (im["width"], im["height"])
                assert min(pil.size) == 160 and pil.format == "JPEG"
        source_anns = {a["id"]: a for a in source["annotations"]}
        kept = {im["id"] for im in compact["images"]}
        assert sorted(a["id"] for a in compact["annotations"]) == sorted(
            a["id"] for a in source["annotations"] if a["image_id"] in kept)
        for ann in compact["annotations"]:
            before, image = source_anns[ann["id"]], source_images[ann["image_id"]]
            new = next(im for im in compact["images"] if im["id"] == ann["image_id"])
            sx, sy = new["width"] / image["width"], new["height"] / image["height"]
            x, y, w, h = before["bbox"]
            assert ann["bbox"] == pytest.approx([x * sx, y * sy, w * sx, h * sy], abs=0.02)
            assert ann["area"] == pytest.approx(before["area"] * sx * sy, abs=0.02)
            assert ann["bbox"][0] + ann["bbox"][2] <= new["width"] + 0.01
            if isinstance(before["segmentation"], list) and before["segmentation"]:
                assert ann["segmentation"][0][:2] == pytest.approx(
                    [before["segmentation"][0][0] * sx, before["segmentation"][0][1] * sy], abs=0.01)
            elif isinstance(before["segmentation"], dict):  # crowd RLE: re-encoded at the new size
                assert ann["segmentation"]["size"] == [new["height"], new["width"]]


def test_compact_copy_never_enlarges():
    assert compact_dataset.scaled_size(300, 200, 320) == (300, 200)
    assert compact_dataset.scaled_size(1024, 768, 320) == (427, 320)
    assert compact_dataset.scaled_size(768, 1024, 320) == (320, 427)


def fake_wheel(folder: Path, filename: str, requires=()) -> Path:
    name = filename.split("-")[0]
    path = folder / filename
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: x\nVersion: 1.0\n"
                    + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_bundle_check_rejects_what_would_not_install(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "good-1.0-py3-none-any.whl", ["numpy", "colorama; sys_platform == 'win32'", "x[y]; extra == 'z'"])
    assert check_bundle.check_wheels(wheels, {"numpy"}) == ["good"]
    fake_wheel(wheels, "good-2.0-py3-none-any.whl")
    fake_wheel(wheels, "native-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", ["notbundled>=1"])
    with pytest.raises(check_bundle.BundleError) as err:
        check_bundle.check_wheels(wheels, {"numpy"})
    message = str(err.value)
    assert "two wheels of good" in message
    assert "native-1.0-cp311-cp311-manylinux_2_17_x86_64.whl does not install on CPython 3.12" in message
    assert "requires notbundled>=1" in message


def test_bundle_check_counts_the_working_tree_against_the_limit(tmp_path):
    repo = tmp_path / "repo"
    bundle = repo / "gpu_bundle"
    (bundle / "data").mkdir(parents=True)
    (bundle / "data" / "blob").write_bytes(b"\0" * (600 * 1024))
    (repo / "tracked.bin").write_bytes(b"\0" * (600 * 1024))
    (repo / ".gitignore").write_text("gpu_bundle/\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    sizes = check_bundle.check_size(bundle, repo, limit_mib=2)
    assert sizes["bundle_mib"] == pytest.approx(0.59, abs=0.01)
    assert sizes["working_tree_mib"] == pytest.approx(0.59, abs=0.01)  # untracked, not ignored: it travels
    with pytest.raises(check_bundle.BundleError, match=r"= 1\.2 MiB is over the 1 MiB a device call may carry"):
        check_bundle.check_size(bundle, repo, limit_mib=1)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("gpu_kit") / "bundle"
    env = dict(os.environ, PYTHON=sys.executable, HIMOE_DATA_ROOT=str(data_root))
    done = subprocess.run(["bash", str(GPU_TOOLS / "make_bundle.sh"), "--tiny", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_tiny_bundle_holds_the_wheels_and_the_compact_data(tiny_bundle):
    wheels = sorted(p.name for p in (tiny_bundle / "wheels").glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["himoe_plugin", "pb1_detectron2"]
    with zipfile.ZipFile(tiny_bundle / "wheels" / wheels[1]) as zf:  # patched, with the model-zoo configs
        assert any(n.endswith("model_zoo/configs/COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml") for n in zf.namelist())
        assert "_C = None" in zf.read("detectron2/layers/deform_conv.py").decode()
    for json_rel, images_rel in compact_dataset.SPLITS:
        compact = json.loads((tiny_bundle / "data" / json_rel).read_text())
        assert len(compact["images"]) == 8
        assert len(list((tiny_bundle / "data" / images_rel).glob("*.jpg"))) == 8
    sizes = json.loads((tiny_bundle / "SIZE.json").read_text())
    assert 0 < sizes["total_mib"] < sizes["limit_mib"] == 64


@pytest.mark.slow
def test_run_checks_dry_run_on_cpu(tiny_bundle, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(GPU_TOOLS / "run_checks.sh"), "--device", "cpu", "--tiny",
                           "--bundle", str(tiny_bundle), "--out", str(out), "--budget-s", "1500"],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "checks.tar.gz").stat().st_size > 0 and (out / "run_checks.log").exists()
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["install", "environment", "cuda_tests", "bench_moe_layer_grouped_mm",
                            "bench_moe_layer_loop", "bench_detector", "quality"]
    assert stages["install"]["status"] == "skipped"
    failed = {name: s for name, s in stages.items() if name != "install" and s["status"] != "passed"}
    assert not failed, (failed, done.stdout[-4000:])
    assert summary["all_passed"] and summary["device"] == "cpu" and summary["tiny"] == "1"
    assert summary["environment"]["cuda_available"] is False
    tests = summary["cuda_tests"]
    assert tests["tests"] == 5 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    bench = summary["benchmarks"]
    assert {"moe_layer_grouped_mm", "moe_layer_loop", "detector"} <= set(bench)
    assert bench["moe_layer_grouped_mm"]["expert_backend"] == "grouped_mm"
    assert {r["phase"] for r in bench["detector"]["results"]} == {"infer", "train"}
    quality = summary["quality"]
    assert quality["error"] is None and quality["iters"] == 2
    for model in ("dense", "himoe"):
        result = quality["models"][model]
        assert result["returncode"] == 0 and result["iterations"] == 2
        assert set(result["bbox"]) >= {"AP", "AP50", "AP75"}


@pytest.mark.slow
def test_check_deps_lists_what_the_device_image_lacks():
    """Resolves device-requirements.txt against PyPI for CPython 3.12 (network), downloads nothing."""
    done = subprocess.run(["bash", str(GPU_TOOLS / "make_bundle.sh"), "--check-deps"],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listed = {line.split("==")[0].lower() for line in done.stdout.splitlines() if "==" in line}
    assert {"pycocotools", "fvcore", "iopath", "yacs", "omegaconf", "hydra-core", "antlr4-python3-runtime"} <= listed
    assert not listed & {"torch", "torchvision", "numpy", "pyyaml", "pillow", "matplotlib", "pytest"}  # in the image
    assert "setuptools>=77,<81 (fallback, installed only where needed)" in done.stdout
