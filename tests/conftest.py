"""Shared test fixtures: the bundled real datasets (required, never skipped)."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def bundled_data_root() -> Path:
    """``$HIMOE_DATA_ROOT`` or ``../shared/data`` next to the checkout; fails loudly if absent."""
    root = Path(os.environ.get("HIMOE_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
    for required in ("aquarium/annotations/instances_train.json", "aquarium/images/valid",
                     "coco128/annotations/instances_train.json"):
        if not (root / required).exists():
            raise RuntimeError(
                f"bundled test data missing: {root / required} (set HIMOE_DATA_ROOT); "
                "these tests need the real datasets and must not be skipped"
            )
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    return bundled_data_root()


@pytest.fixture(scope="session", autouse=True)
def himoe_data_root(data_root: Path):
    """Configs (mmdet ``{{$HIMOE_DATA_ROOT:...}}``) and tools started by the tests resolve
    ``$HIMOE_DATA_ROOT``: point them at the data the tests use."""
    patcher = pytest.MonkeyPatch()
    patcher.setenv("HIMOE_DATA_ROOT", str(data_root))
    yield data_root
    patcher.undo()


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Deselect ``cuda`` tests unless the ``-m`` expression names that marker (run_checks.sh)."""
    if "cuda" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("cuda") is None]
    deselected = [item for item in items if item.get_closest_marker("cuda") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
