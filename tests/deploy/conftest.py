"""Fixtures of the deployment tests: the bundled data, for the configs too."""
from pathlib import Path

import pytest


@pytest.fixture(scope='session', autouse=True)
def himoe_data_root(data_root: Path):
    """Configs resolve ``$HIMOE_DATA_ROOT``: point them at the data the tests use."""
    patcher = pytest.MonkeyPatch()
    patcher.setenv('HIMOE_DATA_ROOT', str(data_root))
    yield data_root
    patcher.undo()
