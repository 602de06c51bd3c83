"""A separate process for the cache tests: runs ops or builds, and prints what it did as JSON.

Run as ``python tests/cache_worker.py MODE [ARGS]`` with ``JITKERN_CACHE_DIR`` set by the test.
Its last stdout line is a JSON object with ``jitkern.stats()``, per-job statuses and an ``ok`` flag
(every result compared with the op's PyTorch reference). Modes:

- ``run``: rms_norm on ``SHAPES`` through Triton's interpreter (one cache key per shape);
- ``run-slow-publish``: as ``run``, but every file written into the cache takes 20 ms longer, so a
  SIGKILL at a random moment often lands inside a publish; prints ``ready`` once imports are done;
- ``run-full-disk LIMIT``: as ``run`` after ``RLIMIT_FSIZE = LIMIT`` bytes (``SIGXFSZ`` ignored, so
  oversized writes fail with ``EFBIG`` the way a full disk fails them with ``ENOSPC``);
- ``build ARCH [ARCH...]``: cross-compile ``SM90_CONFIGS`` of rms_norm for each arch (real Triton);
- ``hold KEY``: hold the build lock of KEY in the first writable layer, print ``held``, sleep.
"""
from __future__ import annotations

import json
import os
import sys
import time

#: One cache key each: (rows, hidden) -> block_n / aligned differ.
SHAPES = ((4, 64), (3, 100), (2, 600), (2, 2048))


def _print(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_ops(shapes=SHAPES) -> dict:
    import torch

    import jitkern
    from jitkern.library.rms_norm import reference

    ok, errors = True, []
    for i, (m, n) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(m, n, generator=g)
        w = torch.randn(n, generator=g)
        try:
            y = jitkern.ops.rms_norm(x, w)
            good = torch.allclose(y, reference(x, w), rtol=1e-4, atol=1e-5)
        except Exception as e:  # report, don't die: the test wants to see it
            good = False
            errors.append(f"{type(e).__name__}: {e}")
        ok &= bool(good)
    return {"pid": os.getpid(), "stats": jitkern.stats(), "ok": ok, "errors": errors}


def build(arch_names) -> dict:
    import jitkern
    from jitkern import arch, build as b
    from jitkern.plan import plan
    from jitkern.library import rms_norm as r

    statuses = {}
    for a in arch_names:
        for cfg in SM90_CONFIGS:
            job = plan(r.SPEC, r.config(*cfg), arch.get(a))
            entry, how = b.get_entry(job)
            statuses[f"{a}:{job.key[:12]}"] = {"how": how, "path": str(entry.path)}
    return {"pid": os.getpid(), "stats": jitkern.stats(), "statuses": statuses, "ok": True, "errors": []}


#: rms_norm configs (dtype, residual, aligned, block_n, single_pass) cross-compiled by ``build``.
SM90_CONFIGS = (("fp32", False, True, 256, True), ("bf16", True, True, 256, True))


def main(argv):
    mode = argv[0]
    if mode == "hold":
        from jitkern.cache import default_store

        lock = default_store().build_lock(argv[1], "a test holding the lock")
        assert lock.acquire()
        _print("held")
        time.sleep(float(argv[2]) if len(argv) > 2 else 120)
        return
    if mode == "build":
        _print(build(argv[1:]))
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch  # noqa: F401  (imported before any limit or kill window)

    import jitkern.ops  # noqa: F401
    import jitkern.library.rms_norm  # noqa: F401

    if mode == "run-slow-publish":
        import jitkern.cache as cache

        real_write = cache._write

        def slow_write(path, data):
            time.sleep(0.02)
            real_write(path, data)

        cache._write = slow_write
        _print("ready")
    elif mode == "run-full-disk":
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(argv[1])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    elif mode != "run":
        raise SystemExit(f"unknown mode {mode!r}")
    _print(run_ops())


if __name__ == "__main__":
    main(sys.argv[1:])
