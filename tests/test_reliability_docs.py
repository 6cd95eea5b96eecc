"""docs/reliability.md maps every guarantee to its tests: each named test must exist."""
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_test_named_in_reliability_md_exists():
    named, missing = 0, []
    for line in (REPO_ROOT / "docs/reliability.md").read_text().splitlines():
        test_file = None  # `::name` continues the file named last on the same row
        for file_part, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", line):
            test_file = file_part or test_file
            if test_file is None:
                continue
            path = REPO_ROOT / test_file
            if not path.is_file():
                missing.append(test_file)
            elif name:
                named += 1
                if not re.search(rf"^def {name}\(", path.read_text(), flags=re.M):
                    missing.append(f"{test_file}::{name}")
    assert named > 50 and not missing, missing
