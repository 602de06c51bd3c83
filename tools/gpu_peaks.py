"""Peak HBM bandwidth and dense bf16 matrix rate of the GPUs the benchmarks run on, by device name.

The benchmarks (``tools/bench_gemm.py``, ``tools/bench_seed_ops.py``, ``tools/check_qk_norm_rope_gpu.py``)
divide by these peaks instead of one hard-coded part's, and print a device-to-device copy measured in
the same run beside the peak (what the memory system really gives; typically 85-90% of the datasheet).

Figures are the vendors' datasheet values for the parts as sold (dense, no structured sparsity):

| part | name (torch.cuda.get_device_name) | HBM | bandwidth | dense bf16 |
|---|---|---|---|---|
| H100 SXM5 | NVIDIA H100 80GB HBM3 | 80 GB HBM3 | 3.35 TB/s | 989 TFLOP/s |
| H100 PCIe | NVIDIA H100 PCIe | 80 GB HBM2e | 2.0 TB/s | 756 TFLOP/s |
| H200 SXM | NVIDIA H200 | 141 GB HBM3e | 4.8 TB/s | 989 TFLOP/s |
| H200 NVL | NVIDIA H200 NVL | 141 GB HBM3e | 4.8 TB/s | 835 TFLOP/s |
| B200 | NVIDIA B200 | 180-192 GB HBM3e | 8.0 TB/s | 2250 TFLOP/s |
| MI300X | AMD Instinct MI300X | 192 GB HBM3 | 5.3 TB/s | 1307 TFLOP/s |
| MI355X | AMD Instinct MI355X | 288 GB HBM3e | 8.0 TB/s | 2517 TFLOP/s |

Lookup matches the most specific table name contained in the device name (case-insensitive), so
``"NVIDIA H200 NVL"`` is not taken for the SXM part and ``"AMD Instinct MI300X VF"`` is the MI300X.
An unknown device gives None: callers then report the measured copy only.

A memory-bound op's floor (issue 19: 80% of the HBM peak "where the bytes moved allow it") is judged
per shape against a copy moving the same bytes (``same_bytes_copy``): a short stream never reaches a
long one's bandwidth (launch, ramp-up and tail are a larger share of it; on an H200 a copy moving
67 MiB reached 68% of the datasheet peak where one moving 1 GiB reached 87%), so ``floor_row`` says
whether the floor applies to a shape (the same-bytes copy reaches it) and, either way, how close the
op comes to that copy.
No torch import at module level (``measure_copy`` takes the torch module and a bench function).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Peak:
    part: str
    match: str  # lower-case substring of torch.cuda.get_device_name()
    hbm_bytes_per_s: float
    bf16_flop_per_s: float  # dense tensor-core rate, no sparsity
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


PEAKS: tuple[Peak, ...] = (
    Peak("H100 SXM5", "h100 80gb hbm3", 3.35e12, 989.4e12, "NVIDIA H100 datasheet (SXM)"),
    Peak("H100 SXM5", "h100 sxm", 3.35e12, 989.4e12, "NVIDIA H100 datasheet (SXM)"),
    Peak("H100 PCIe", "h100 pcie", 2.0e12, 756.5e12, "NVIDIA H100 datasheet (PCIe)"),
    Peak("H100 NVL", "h100 nvl", 3.9e12, 835.0e12, "NVIDIA H100 datasheet (NVL)"),
    Peak("H200 NVL", "h200 nvl", 4.8e12, 835.0e12, "NVIDIA H200 datasheet (NVL)"),
    Peak("H200 SXM", "h200", 4.8e12, 989.4e12, "NVIDIA H200 datasheet (SXM)"),
    Peak("B200", "b200", 8.0e12, 2250e12, "NVIDIA HGX B200 datasheet (per GPU, dense)"),
    Peak("MI300X", "mi300x", 5.3e12, 1307.4e12, "AMD Instinct MI300X datasheet"),
    Peak("MI355X", "mi355x", 8.0e12, 2516.6e12, "AMD Instinct MI355X datasheet"),
)


def lookup(device_name: str) -> Optional[Peak]:
    """The table row for ``device_name`` (the longest matching name wins), or None if unknown."""
    name = (device_name or "").lower()
    hits = [p for p in PEAKS if p.match in name]
    return max(hits, key=lambda p: len(p.match)) if hits else None


def measure_copy(torch, do_bench, nbytes: int = 1 << 30, device: str = "cuda") -> dict:
    """A device-to-device copy of ``nbytes`` (bytes read + written over the median time): the
    bandwidth this card gives in this run, to print beside the datasheet peak."""
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255),
            torch.empty(nbytes, dtype=torch.uint8, device=device)]
    ms = do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=10, rep=100, return_mode="median")
    bufs.clear()
    torch.cuda.empty_cache()
    return {"copy_bytes": nbytes, "copy_ms": ms, "copy_bytes_per_s": 2 * nbytes / ms * 1e3}


def same_bytes_copy(torch, do_bench, nbytes: int, device: str = "cuda") -> float:
    """Bytes per second of a device copy moving ``nbytes`` in all (half read, half written): what a
    plain stream of an op's size reaches in this run, launch and ramp included."""
    return measure_copy(torch, do_bench, max(1, nbytes // 2), device)["copy_bytes_per_s"]


#: The memory-bound ops' floor, as a fraction of the datasheet HBM peak (issue 19).
FLOOR = 0.80


def floor_row(op_bytes_per_s: float, copy_bytes_per_s: float, peak: Optional[dict], floor: float = FLOOR) -> dict:
    """One shape judged against the floor: the op's and the same-bytes copy's fractions of the peak
    (None where the peak is unknown), the op's fraction of that copy, whether the floor applies (the
    copy itself reaches it) and whether the op meets it (None where it does not apply)."""
    op_frac, copy_frac = frac(op_bytes_per_s, peak), frac(copy_bytes_per_s, peak)
    applies = copy_frac is not None and copy_frac >= floor
    return {"frac_peak": op_frac, "same_bytes_copy_frac_peak": copy_frac,
            "frac_same_bytes_copy": op_bytes_per_s / copy_bytes_per_s, "floor": floor, "floor_applies": applies,
            "floor_met": (op_frac >= floor) if applies else None}


def describe_floor(row: dict) -> str:
    """``floor_row`` in a few words for a table cell."""
    if row["frac_peak"] is None:
        return f"{row['frac_same_bytes_copy'] * 100:.0f}% of a same-bytes copy"
    verdict = ("meets" if row["floor_met"] else "misses") if row["floor_applies"] else "n/a"
    return (f"{row['frac_peak'] * 100:4.1f}% peak; same-bytes copy {row['same_bytes_copy_frac_peak'] * 100:4.1f}% "
            f"(op at {row['frac_same_bytes_copy'] * 100:3.0f}% of it); {row['floor'] * 100:.0f}% floor {verdict}")


def device_report(torch, do_bench=None, copy: bool = True) -> dict:
    """What a benchmark's JSON says about its GPU: the device name, the table row (or None), and,
    when ``copy``, the measured device copy and its fraction of the datasheet peak."""
    name = torch.cuda.get_device_name()
    peak = lookup(name)
    rep = {"device": name, "peak": peak.as_dict() if peak else None}
    if copy:
        if do_bench is None:
            from triton.testing import do_bench
        rep.update(measure_copy(torch, do_bench))
        if peak:
            rep["copy_frac_of_peak"] = rep["copy_bytes_per_s"] / peak.hbm_bytes_per_s
    return rep


def describe(rep: dict) -> str:
    """One line: device, datasheet peaks, measured copy beside the bandwidth peak."""
    peak = rep.get("peak")
    parts = [rep["device"]]
    if peak:
        parts.append(f"peak HBM {peak['hbm_bytes_per_s'] / 1e12:.2f} TB/s, dense bf16 "
                     f"{peak['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s ({peak['part']}, {peak['source']})")
    else:
        parts.append("no datasheet peak known for this device (tools/gpu_peaks.py)")
    if "copy_bytes_per_s" in rep:
        txt = f"measured {rep['copy_bytes'] >> 20} MiB device copy {rep['copy_bytes_per_s'] / 1e12:.2f} TB/s"
        if peak:
            txt += f" ({rep['copy_frac_of_peak'] * 100:.1f}% of peak)"
        parts.append(txt)
    return "; ".join(parts)


def frac(value: float, peak: Optional[dict], field: str = "hbm_bytes_per_s") -> Optional[float]:
    """``value`` as a fraction of the peak's ``field``, or None where the peak is unknown."""
    return value / peak[field] if peak else None
