"""Fuzz the live API against its own OpenAPI document (schemathesis, bounded examples).

Checks for every generated request: no 5xx, the response matches the documented schema,
and every error answer is a problem document.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import PYTHON, ROOT, free_port


@pytest.fixture(scope="module")
def live_server(base_config: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """run.py on the test database and Redis, in a process of its own (schemathesis calls it
    with blocking HTTP from the test thread)."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": base_config.database.url,
        "REDIS_URL": base_config.redis.url,
        # the fuzzer sends hundreds of requests: keep the limiter out of the way of the checks
        "HOTPATH_RATELIMIT_POLICIES": '{ protected = "1000000/minute" }',
        # schemathesis reads an event stream until 20 events or 10 s: ticks every 50 ms keep it short
        "HOTPATH_FEED_TICKER_INTERVAL": "0.05",
    }
    log = (tmp_path_factory.mktemp("fuzz") / "server.log").open("wb")
    proc = subprocess.Popen([PYTHON, "run.py", "--port", str(port)], cwd=ROOT, env=env, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "run.py exited"
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "run.py did not become ready"
                time.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def api_schema(live_server: str) -> Any:
    return schemathesis.openapi.from_url(f"{live_server}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def errors_are_problems(ctx: Any, response: Any, case: Any) -> None:
    if response.status_code >= 400:
        value = response.headers.get("content-type", "")
        ctype = value[0] if isinstance(value, list) else value
        assert ctype.startswith(("application/problem+", "application/yaml", "application/x-yaml")), (
            f"{response.status_code} answered with {ctype!r}"
        )


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_fuzz(case: Any) -> None:
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance, errors_are_problems])
