"""Shared pytest configuration: the repository root and the path helpers every tier uses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shared test helpers assert too: show what differed when one fails.
pytest.register_assert_rewrite("payper_dev.testing")

from payper.kube import WARNINGS_ENV  # noqa: E402 - after the rewrite hook

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session", autouse=True)
def api_warnings_are_errors() -> Iterator[None]:
    """A warning from the API server (an unknown field, a deprecated API) fails the test
    that caused it, in this process and in every process the tests start."""
    before = os.environ.get(WARNINGS_ENV)
    os.environ[WARNINGS_ENV] = "error"
    yield
    if before is None:
        del os.environ[WARNINGS_ENV]
    else:
        os.environ[WARNINGS_ENV] = before
