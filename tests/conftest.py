"""Shared test set-up.

CPU numerics run through Triton's interpreter, which must be switched on before triton is imported;
GPU-only tests skip where no GPU is present. Every test gets a private cache directory.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import jitkern  # noqa: E402


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


_skip_without_gpu = pytest.mark.skipif(not _has_gpu(), reason="needs a GPU (run: TRITON_INTERPRET=0 pytest -m gpu)")


def requires_gpu(test):
    """Mark a test GPU-only: skipped without a GPU, selected by ``-m gpu`` (with TRITON_INTERPRET=0)."""
    return pytest.mark.gpu(_skip_without_gpu(test))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh, private JITKERN_CACHE_DIR and fresh process state (``jitkern.reset()``)."""
    d = tmp_path / "jitkern-cache"
    monkeypatch.setenv("JITKERN_CACHE_DIR", str(d))
    for name in ("JITKERN_REMOTE_CACHE", "JITKERN_REMOTE_CACHE_KEY", "JITKERN_CACHE_SIGN_KEY", "JITKERN_CACHE_VERIFY_KEY",
                 "JITKERN_CACHE_MAX_SIZE"):  # no developer's remote cache, keys or cap in tests
        monkeypatch.delenv(name, raising=False)
    jitkern.reset()
    yield d
    jitkern.reset()


@pytest.fixture
def launches(monkeypatch):
    """Names of the kernels launched in the test (interpreted and GPU), in launch order."""
    from jitkern import launcher
    from jitkern.builders.triton import InterpretedKernel

    n = []
    for cls in (InterpretedKernel, launcher.GPUKernel):
        orig = cls.launch

        def counting(self, *a, _orig=orig):
            n.append(self.name)
            return _orig(self, *a)

        monkeypatch.setattr(cls, "launch", counting)
    return n
