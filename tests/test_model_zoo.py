"""The model zoo: docs/MODEL_ZOO.md and the OpenMMLab metafile (model-index.yml) list configs that
load and build, and the numbers and checksums of the measured entries (benchmarks/model_zoo.py)."""
import json
import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
ZOO_PAGE = REPO_ROOT / "docs" / "MODEL_ZOO.md"
RESULTS = REPO_ROOT / "benchmarks" / "results" / "model_zoo.json"
NOT_TRAINED = "not trained here"


def metafile_models():
    index = yaml.safe_load((REPO_ROOT / "model-index.yml").read_text())
    collections, models = set(), []
    for path in index["Import"]:
        metafile = yaml.safe_load((REPO_ROOT / path).read_text())
        collections |= {c["Name"] for c in metafile["Collections"]}
        models += metafile["Models"]
    return collections, models


def page_rows():
    """Table rows of the zoo page that name a config: config path -> row text."""
    rows = {}
    for line in ZOO_PAGE.read_text().splitlines():
        found = re.findall(r"`(configs/[^`]+)`", line)
        if line.startswith("|") and found:
            rows[found[0]] = line
    return rows


def listed_configs():
    return sorted(set(page_rows()) | {m["Config"] for m in metafile_models()[1]})


def test_metafile_entries_are_complete():
    collections, models = metafile_models()
    names = [m["Name"] for m in models]
    assert len(names) == len(set(names)) and names
    for model in models:
        assert model["In Collection"] in collections, model["Name"]
        assert (REPO_ROOT / model["Config"]).is_file(), model["Config"]
        assert Path(model["Config"]).stem == model["Name"]
        assert model["Config"].startswith("configs/mmdet/")
        assert model["Metadata"]["Training Data"] in ("COCO", "Aquarium")


def test_measured_entries_agree_with_the_results_page_and_metafile():
    measured = json.loads(RESULTS.read_text())["entries"]
    rows = page_rows()
    _, models = metafile_models()
    by_config = {m["Config"]: m for m in models}
    assert {"detectron2", "mmdet"} == {entry["framework"] for entry in measured.values()}
    for name, entry in measured.items():
        row = rows[entry["config"]]
        assert entry["sha256"][:8] in row and Path(entry["published"]).name in row, name
        assert Path(entry["published"]).stem.endswith(entry["sha256"][:8])
        for metric in ("AP", "APs", "APm", "APl"):
            assert f"{entry['metrics'][metric]:.2f}" in row, (name, metric)
        if entry["framework"] == "mmdet":
            model = by_config[entry["config"]]
            assert model["Weights"].endswith(Path(entry["published"]).name)
            assert model["Metadata"]["SHA256"] == entry["sha256"]
            box_ap = model["Results"][0]["Metrics"]["box AP"]
            assert box_ap == round(entry["metrics"]["AP"], 2)
    measured_configs = {entry["config"] for entry in measured.values()}
    for config, row in rows.items():
        assert (config in measured_configs) != (NOT_TRAINED in row), config
    for model in models:
        assert ("Weights" in model) == (model["Config"] in measured_configs), model["Name"]


@pytest.mark.parametrize("config", listed_configs())
def test_every_listed_config_loads_and_builds(config, data_root, monkeypatch):
    monkeypatch.setenv("HIMOE_DATA_ROOT", str(data_root))
    path = REPO_ROOT / config
    if config.startswith("configs/detectron2/") and path.suffix == ".yaml":
        from detectron2.modeling import build_model

        from himoe_plugin.detectron2 import get_himoe_cfg

        cfg = get_himoe_cfg()
        cfg.merge_from_file(str(path))
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
    elif config.startswith("configs/detectron2/"):
        from detectron2.config import LazyConfig, instantiate

        model = instantiate(LazyConfig.load(str(path)).model)
    else:
        from mmdet.registry import MODELS
        from mmengine.config import Config
        from mmengine.registry import init_default_scope

        import himoe_plugin.mmdet  # noqa: F401

        init_default_scope("mmdet")
        cfg = Config.fromfile(str(path))
        cfg.model.backbone.init_cfg = None  # no download
        model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
