import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `from tiny import make_tiny`

from tiny import ARCHS, make_tiny

SHARED_CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved, sharded tiny checkpoint per architecture, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch) for arch in ARCHS}
