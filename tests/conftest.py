"""Shared test set-up: offline, 2 threads, and the real datasets in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# One embedding cache for the whole session, never the user's own.
if not os.environ.get("EQUI_CACHE", "").startswith("/tmp"):
    import tempfile

    os.environ["EQUI_CACHE"] = tempfile.mkdtemp(prefix="equi-test-cache-")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_DATA = REPO / "examples" / "data"


def pytest_configure(config):
    import torch

    # EQUI_TEST_THREADS=1 (or 4) runs the suite with another torch thread count: what is promised byte-identical
    # must stay so (README, Reliability).
    torch.set_num_threads(int(os.environ.get("EQUI_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real datasets not found at {SHARED_DATA}: the repo must sit beside shared/")
    return SHARED_DATA


@pytest.fixture
def private_equi_cache(tmp_path, monkeypatch):
    """``$EQUI_CACHE`` of this test alone (reference log-probs, judge answers), not the session's shared one; use
    it as ``pytestmark = pytest.mark.usefixtures("private_equi_cache")``."""
    monkeypatch.setenv("EQUI_CACHE", str(tmp_path / "equi-cache"))
    return tmp_path / "equi-cache"


@pytest.fixture
def fresh_python():
    """Run a snippet in a new interpreter at the repository root (what a fresh process imports, loads or prints);
    returns the ``CompletedProcess`` (text output captured)."""
    import subprocess
    import sys

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)

    return run


@pytest.fixture(params=["numba", "numpy"])
def kernel_mode(request, monkeypatch):
    """Each test twice: with the numba kernels (n-grams, dense products, segment splitter, span merge), and with
    them switched off (the numpy/polars/``re`` paths): every compiled path asks ``curation.refusal._kernels``."""
    if request.param == "numba":
        pytest.importorskip("numba")
    else:
        from curation import refusal

        monkeypatch.setattr(refusal, "_kernels", lambda: None)
    return request.param
