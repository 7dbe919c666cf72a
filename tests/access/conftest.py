"""Fixtures of the key tests: the app with the shipped access rules (tests/conftest.py opens
every route for the features' own tests)."""

from __future__ import annotations

from typing import Any

import pytest

from server.app import create_app
from server.config import Config
from tests.helpers import replace


@pytest.fixture
def auth_cfg(cfg: Config) -> Config:
    """The shipped access rules: no route open but the public reads."""
    return replace(cfg, auth={"open_routes": ()})


@pytest.fixture
async def api(aiohttp_client: Any, auth_cfg: Config) -> Any:
    return await aiohttp_client(create_app(auth_cfg))
