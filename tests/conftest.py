"""Shared fixtures.

Real data lives outside the project (``../shared/data`` beside the checkout, or
the folder named by ``GMAN_SHARED_DATA``); tests that need it are skipped, with
the reason, where it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("GMAN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real-data folder; skips the test where it is absent."""
    path = shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"shared real data not found at {path} (set GMAN_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch intra-op thread, restoring the count afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
