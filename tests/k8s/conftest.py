"""Every overlay and composition rendered once per session (kustomize), shared by the modules."""

from __future__ import annotations

from typing import Any

import pytest

from tests.k8s.render import all_renders


@pytest.fixture(scope="session")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    return dict(all_renders(tmp_path_factory.mktemp("compose")))
