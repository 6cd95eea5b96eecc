"""docs/BENCHMARKS.md reports what the benchmark scripts measured: the Cascade R-CNN and DINO
tables are checked against benchmarks/results/{cascade,dino}.json, which the scripts write."""
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
FRAMEWORKS = {"detectron2": "Detectron2", "mmdet": "MMDetection"}
PHASES = {"infer": "inference", "train": "training step"}


def section(title: str) -> str:
    text = (REPO_ROOT / "docs" / "BENCHMARKS.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def table_rows(text: str, first_cells: tuple) -> list:
    """The table rows of ``text`` whose leading cells are ``first_cells``."""
    prefix = "| " + " | ".join(first_cells) + " |"
    return [line for line in text.splitlines() if line.startswith(prefix)]


def ratio(summary: dict) -> str:
    """As ``benchmarks/timing.py`` writes a ratio: median (min-max)."""
    return f"{summary['ratio_median']:.2f} ({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f})"


def in_order(row: str, values: list) -> bool:
    position = 0
    for value in values:
        position = row.find(value, position)
        if position < 0:
            return False
        position += len(value)
    return True


def test_cascade_section_reports_the_measured_ratios_and_counts():
    measured = json.loads((RESULTS / "cascade.json").read_text())
    text = section("6. Cascade R-CNN")
    variants = ["k1", "k1_scene", "k1_instance", "k2", "k2_instance"]
    assert {r["framework"] for r in measured["results"]} == set(FRAMEWORKS)
    for result in measured["results"]:
        rows = table_rows(text, (FRAMEWORKS[result["framework"]], PHASES[result["phase"]]))
        summary = result["summary"]
        expected = [f"{summary['dense']['median_s']:.2f}"] + [ratio(summary[name]) for name in variants]
        assert len(rows) == 1 and in_order(rows[0], expected), (result["framework"], result["phase"])
        counts = [f"{result['info'][name]['gmacs']:.1f}" for name in ("dense", "k1", "k1_instance", "k2")]
        assert all(any(c in line for line in text.splitlines() if line.startswith("| ")) for c in counts)


def test_dino_section_reports_the_measured_ratios_and_counts():
    measured = json.loads((RESULTS / "dino.json").read_text())
    assert (measured["size"], measured["layers"]) == (512, 6)
    text = section("7. DINO")
    infer, train = ({r["phase"]: r["summary"] for r in measured["results"]}[p] for p in ("infer", "train"))
    assert in_order(table_rows(text, ("dense",))[0], [f"{infer['dense']['median_s']:.2f} s",
                                                       f"{train['dense']['median_s']:.2f} s"])
    for name, info in measured["info"].items():
        rows = table_rows(text, (name,))
        counts = [f"{info['params']['total'] / 1e6:.1f}", f"{info['params']['active'] / 1e6:.1f}",
                  f"{info['gmacs']:.1f}"]
        assert any(in_order(row, counts) for row in rows), name
        if name == "dense":
            continue
        timings = [ratio(infer[name]), ratio(train[name]) if name in train else "not run"]
        assert any(in_order(row, timings) for row in rows), name
