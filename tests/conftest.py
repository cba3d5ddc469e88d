"""Test-wide settings."""

import pytest


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path_factory, monkeypatch):
    # Keep the source-hash cache out of the user's ~/.cache and independent between tests.
    monkeypatch.setenv("CKPTBEND_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
