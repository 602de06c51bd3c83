"""tools/profile_decode.py (a GPU tool): its arguments, trace parsing and kernel table, on the CPU."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "profile_decode.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("profile_decode", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments(tool, tmp_path):
    a = tool.parse_args(["--layers", "4", "--batches", "1,32,128", "--out", str(tmp_path / "p.json")])
    assert (a.layers, a.batches, a.steps, a.top, a.prompt) == (4, [1, 32, 128], 10, 20, 128)
    assert a.impls == ["jitkern_cuda_graph", "reference_torch_compile"] and a.tiny is False
    with pytest.raises(SystemExit):
        tool.parse_args(["--out", "x.json", "--impls", "jitkern_cuda_graph,nope"])
    with pytest.raises(SystemExit):
        tool.parse_args([])  # --out is required


def test_kernel_table_per_step(tool):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemm_k", "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "gemm_k", "dur": 14.0},
        {"ph": "X", "cat": "kernel", "name": "norm_k", "dur": 2.0},
        {"ph": "X", "cat": "kernel", "name": "norm_k", "dur": 2.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "dur": 1.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "dur": 1.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "dur": 5.0},  # CPU side: not counted
        {"ph": "i", "cat": "kernel", "name": "marker"},
    ]}
    recs = tool.gpu_records(trace)
    assert len(recs) == 6
    t = tool.kernel_table(recs, steps=2, top=2)
    assert t["gpu_us"] == 15.0 and t["distinct"] == 3 and t["launches"] == 3
    assert [r["name"] for r in t["kernels"]] == ["gemm_k", "norm_k"]
    assert t["kernels"][0] == {"name": "gemm_k", "count": 1.0, "total_us": 12.0, "share": 0.8}
    assert t["other"]["count"] == 1.0 and t["other"]["total_us"] == 1.0 and t["other"]["name"] == "(1 others)"
    text = tool.format_case({"batch": 1, "impl": "jitkern_cuda_graph", "table": t, "step_ms": 0.02})
    assert "gemm_k" in text and "80.0%" in text and "15.0 us GPU per step" in text


def test_cli_parses_and_needs_a_gpu(tmp_path):
    """--help works anywhere; on a machine without CUDA it says so (no traceback) and writes nothing."""
    r = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--batches" in r.stdout
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the tool would run for real")
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, str(TOOL), "--layers", "1", "--batches", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr and not out.exists()


def test_cpu_smoke_run_writes_the_tables(tmp_path, cache_dir):
    """The whole script on the tiny config (eager cases, CPU ops standing in for kernels)."""
    import json
    import os

    out = tmp_path / "p.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JITKERN_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--tiny", "--prompt", "4", "--batches", "1",
                        "--steps", "1", "--top", "3", "--impls", "jitkern_eager,reference_eager", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [(c["batch"], c["impl"]) for c in res["cases"]] == [(1, "jitkern_eager"), (1, "reference_eager")]
    for c in res["cases"]:
        assert len(c["table"]["kernels"]) == 3 and c["table"]["gpu_us"] > 0 and c["step_ms"] > 0
        assert c["rel_err_vs_ref_eager"] < 0.05
