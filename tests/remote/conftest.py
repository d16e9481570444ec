"""Fixtures shared by the S3 suites; each suite defines its own ``s3`` (its moto server and bucket)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def fs(s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """An s3fs filesystem on moto in this process (for the checks and the injected failures)."""
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, s3[key])
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3["FSSPEC_S3_ENDPOINT_URL"])
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()
