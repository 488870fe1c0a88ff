"""The chaos suite's fixture: a fresh cluster of real processes per scenario."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Yield servers with an api; each scenario starts its own workers and beats."""
    cluster = Cluster(tmp_path)
    try:
        cluster.start_servers()
        cluster.start_api()
        yield cluster
    finally:
        cluster.stop_all()
