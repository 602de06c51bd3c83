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


def test_floor_applies_only_where_a_copy_of_the_same_bytes_reaches_it():
    peak = gpu_peaks.lookup("NVIDIA H200").as_dict()  # 4.8 TB/s
    short = gpu_peaks.floor_row(2.4e12, 3.2e12, peak)  # a copy of these bytes reaches 66.7%: no floor
    assert short["floor_applies"] is False and short["floor_met"] is None
    assert short["frac_same_bytes_copy"] == pytest.approx(0.75) and short["frac_peak"] == pytest.approx(0.5)
    long = gpu_peaks.floor_row(3.7e12, 4.2e12, peak)  # the copy reaches 87.5%: 77% misses the floor
    assert long["floor_applies"] is True and long["floor_met"] is False
    assert gpu_peaks.floor_row(3.9e12, 4.2e12, peak)["floor_met"] is True
    assert "misses" in gpu_peaks.describe_floor(long) and "n/a" in gpu_peaks.describe_floor(short)
    unknown = gpu_peaks.floor_row(1e12, 2e12, None)  # no datasheet: the share of the copy only
    assert unknown["floor_applies"] is False and "50% of a same-bytes copy" in gpu_peaks.describe_floor(unknown)


def test_same_bytes_copy_moves_half_the_bytes_each_way():
    seen = {}

    class FakeTorch:
        uint8 = "u8"

        @staticmethod
        def empty(n, dtype, device):
            seen.setdefault("sizes", []).append(n)

            class Buf:
                def random_(self, *a):
                    return self

                def copy_(self, other):
                    return self
            return Buf()

        class cuda:
            @staticmethod
            def empty_cache():
                pass

    bw = gpu_peaks.same_bytes_copy(FakeTorch, lambda fn, **kw: (fn(), 0.5)[1], 1 << 20)
    assert seen["sizes"] == [1 << 19, 1 << 19] and bw == pytest.approx((1 << 20) / 0.5e-3)
