"""tools/gpu_peaks.py: the benchmarks' per-device peak table, keyed by torch.cuda.get_device_name()."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import gpu_peaks  # noqa: E402


@pytest.mark.parametrize("name, part, bw, flops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM5", 3.35e12, 989.4e12),
    ("NVIDIA H200", "H200 SXM", 4.8e12, 989.4e12),
    ("NVIDIA H200 NVL", "H200 NVL", 4.8e12, 835e12),   # not the SXM part's row
    ("NVIDIA B200", "B200", 8.0e12, 2250e12),
    ("AMD Instinct MI300X", "MI300X", 5.3e12, 1307.4e12),
    ("AMD Instinct MI300X VF", "MI300X", 5.3e12, 1307.4e12),
    ("AMD Instinct MI355X", "MI355X", 8.0e12, 2516.6e12),
])
def test_lookup_by_device_name(name, part, bw, flops):
    p = gpu_peaks.lookup(name)
    assert (p.part, p.hbm_bytes_per_s, p.bf16_flop_per_s) == (part, bw, flops)


def test_unknown_device_has_no_peak_and_reports_the_measured_copy():
    assert gpu_peaks.lookup("NVIDIA GeForce RTX 4090") is None and gpu_peaks.lookup("") is None
    rep = {"device": "Some GPU", "peak": None, "copy_bytes": 1 << 30, "copy_bytes_per_s": 1.5e12}
    line = gpu_peaks.describe(rep)
    assert "no datasheet peak" in line and "1.50 TB/s" in line
    assert gpu_peaks.frac(1e12, None) is None


def test_describe_prints_the_measured_copy_beside_the_peak():
    peak = gpu_peaks.lookup("NVIDIA H200").as_dict()
    rep = {"device": "NVIDIA H200", "peak": peak, "copy_bytes": 1 << 30, "copy_bytes_per_s": 4.22e12,
           "copy_frac_of_peak": 4.22e12 / peak["hbm_bytes_per_s"]}
    line = gpu_peaks.describe(rep)
    assert "peak HBM 4.80 TB/s" in line and "989 TFLOP/s" in line and "4.22 TB/s (87.9% of peak)" in line
    assert gpu_peaks.frac(2.4e12, peak) == pytest.approx(0.5)
