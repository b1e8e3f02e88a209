from pathlib import Path

import pytest

from archlab.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "train" / "tiny.yaml"


@pytest.fixture
def tiny_config(tmp_path):
    """A seconds-long CPU config writing into a fresh run directory; pass extra dotted overrides."""

    def make(*overrides: str, run_dir: Path | None = None):
        return load_config(TINY, [f"run.dir={run_dir or tmp_path / 'run'}", *overrides])

    return make
