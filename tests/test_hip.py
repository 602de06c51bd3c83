"""The HIP builder, offline: real clang compiles for gfx942/gfx950 (bare code objects, v5, the right
ELF mach), resource figures read from the code object's metadata note, the LDS budget, CK found and
absent (seed 002), and what the key holds. Nothing here runs on AMD hardware.

Where the toolchain is missing (a developer machine without clang-22/CK) each test checks that the
reason is reported instead; in CI (``CI`` set, ``.ci/run`` installs the toolchain) it must be there.
"""
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jitkern
from jitkern import arch, binaries, budget, ck, counters, doctor, failures
from jitkern.build import get_entry, report
from jitkern.plan import plan
from jitkern.builders import hip
from jitkern.cache import Store, default_store
from jitkern.errors import OverBudgetError, RecordedBuildFailure, UnavailableError
from jitkern.library import qk_norm_rope as qnr
from jitkern.spec import Arg, Config, OpSpec, Variant

REPO = Path(__file__).resolve().parents[1]
IN_CI = bool(os.environ.get("CI"))
GFX = ("gfx942", "gfx950")
MACH = {"gfx942": 0x4C, "gfx950": 0x4F}
#: EI_ABIVERSION of an AMDGPU HSA code object v5 (LLVM's ELFABIVERSION_AMDGPU_HSA_V5).
ABI_V5 = 3


def toolchain_missing() -> bool:
    """True (after checking the reason is the real one) where this machine has no HIP compiler."""
    reason = hip.HIP.probe(arch.get("gfx942"))
    if reason is None:
        return False
    assert not IN_CI, f"CI must install the HIP toolchain (.ci/run): {reason}"
    assert "no HIP compiler found" in reason or "device libraries" in reason
    return True


def ck_missing() -> bool:
    found, why = ck.find()
    if found is not None:
        return False
    assert not IN_CI, f"CI must provide CK's headers (.ci/run): {why}"
    assert "CK headers not found" in why
    return True


def hip_config(a):
    """The first hip configuration qk_norm_rope declares for ``a`` (the one doctor reports)."""
    return next(c for c in qnr.SPEC.configs(a) if c.variant == "hip")


@pytest.fixture(scope="session")
def session_store(tmp_path_factory):
    return Store([tmp_path_factory.mktemp("hip-session")])


@pytest.fixture(scope="session")
def ck_builds(session_store):
    """qk_norm_rope's CK-based hip variant built once per session for gfx942 and gfx950."""
    if toolchain_missing() or ck_missing():
        return None
    out = {}
    for name in GFX:
        a = arch.get(name)
        job = plan(qnr.SPEC, hip_config(a), a)
        entry, _ = get_entry(job, session_store)
        out[name] = (job, entry)
    return out


def _header(data: bytes):
    machine = struct.unpack_from("<H", data, 18)[0]
    flags = struct.unpack_from("<I", data, 48)[0]
    return machine, flags, data[7], data[8]


def test_code_object_is_bare_v5_for_its_arch(ck_builds, session_store):
    """An ELF code object (not a clang offload bundle) for the job's arch, code object v5 like Triton's."""
    if ck_builds is None:
        return
    gfx942 = arch.get("gfx942")
    triton_entry, _ = get_entry(plan(qnr.SPEC, qnr.triton_config("bf16", "bf16", "i64", 64, True), gfx942),
                                session_store)
    t_data = triton_entry.file("kernel.hsaco").read_bytes()
    for name, (job, entry) in ck_builds.items():
        data = entry.file("kernel.hsaco").read_bytes()
        assert data[:4] == b"\x7fELF"  # a bundle starts with "__CLANG_OFFLOAD_BUNDLE__"
        machine, flags, osabi, abiversion = _header(data)
        assert machine == binaries.EM_AMDGPU and flags & 0xFF == MACH[name]
        assert binaries.matches(job.arch, data) and not binaries.matches(arch.get(
            "gfx950" if name == "gfx942" else "gfx942"), data)
        assert osabi == 64 and abiversion == ABI_V5  # ELFOSABI_AMDGPU_HSA, code object v5
        md = binaries.amdgpu_metadata(data)
        assert md["amdhsa.version"] == [1, 2]  # metadata version of code object v5
        assert md["amdhsa.target"].endswith(name)
        assert [k[".name"] for k in md["amdhsa.kernels"]] == ["qk_norm_rope_kernel"]
        assert "--offload-arch=" + name in entry.file("build.log").read_text()
    assert _header(t_data)[3] == ABI_V5 and _header(t_data)[2] == 64  # what Triton's AMD backend emits


def _readelf_figures(path: Path) -> dict:
    tool = shutil.which("llvm-readelf-22") or shutil.which("llvm-readelf")
    assert tool, "llvm-readelf (llvm-22) is installed with the toolchain"
    text = subprocess.run([tool, "--notes", str(path)], capture_output=True, text=True, check=True).stdout
    get = lambda key: int(re.search(rf"^\s*-?\s*\.{key}:\s+(\d+)", text, re.MULTILINE).group(1))  # noqa: E731
    return {"vgprs": get("vgpr_count"), "agprs": get("agpr_count"), "sgprs": get("sgpr_count"),
            "lds_bytes": get("group_segment_fixed_size"), "scratch_bytes": get("private_segment_fixed_size"),
            "spills": get("vgpr_spill_count") + get("sgpr_spill_count")}


def test_metadata_figures_recorded_and_match_llvm_readelf(ck_builds):
    """The entry's resources come from the code object's metadata note, as LLVM's own reader sees them."""
    if ck_builds is None:
        return
    for name, (job, entry) in ck_builds.items():
        res = entry.meta["resources"]
        assert entry.meta["status"] == budget.OK
        want = _readelf_figures(entry.file("kernel.hsaco"))
        assert {k: res[k] for k in want} == want
        assert res["vgprs"] > 0 and res["sgprs"] > 0 and res["wavefront_size"] == 64
        assert res["lds_bytes"] == 0 and res["scratch_bytes"] == 0 and res["spills"] == 0
        assert res["max_workgroup_size"] == 64 * qnr.HEADS_PER_BLOCK  # __launch_bounds__ took effect
        assert res["regs_limit"] == 512 and res["budget_bytes"] == job.arch.shared_mem_per_block


def test_prebuild_reports_hip_built_for_both_arches(tmp_path):
    """``jitkern prebuild --arch gfx942,gfx950 --op qk_norm_rope``: the hip variant built for both, its
    figures in the JSON report, every code object for the right mach, within budget."""
    if toolchain_missing() or ck_missing():
        return
    cache, report = tmp_path / "cache", tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "jitkern", "prebuild", "--arch", "gfx942,gfx950", "--op",
                        "qk_norm_rope", "--limit", "2", "--jobs", "2", "--progress", "none", "--cache-dir",
                        str(cache), "--report", str(report)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    records = json.loads(report.read_text())["artifacts"]
    hip_recs = [x for x in records if x["variant"] == "hip"]
    assert sorted(x["arch"] for x in hip_recs) == ["gfx942", "gfx950"]
    store = Store([cache])
    for rec in records:
        assert rec["status"] == "built", rec
        for k in ("vgprs", "sgprs", "lds_bytes", "scratch_bytes", "spills"):
            assert isinstance(rec[k], int), (k, rec)  # Triton's AMD artifacts carry the same figures
        entry = store.lookup(rec["key"])
        assert binaries.matches(arch.get(rec["arch"]), entry.file("kernel.hsaco").read_bytes())
        assert rec["lds_bytes"] <= arch.get(rec["arch"]).shared_mem_per_block


# ---- the LDS budget -------------------------------------------------------------------------------
LDS_SPEC = OpSpec(
    name="test_lds_hog",
    variants=(Variant(name="hip", template="lds_hog.hip.j2", kernel="lds_hog", args=(Arg("x", "*fp32"),),
                      kind="hip"),),
    template_dir=Path(__file__).parent / "hip_templates",
    fn=lambda x: x,
    reference=lambda x: x,
    configs=lambda a: [],
)


def _lds_job(name: str, kib: int):
    return plan(LDS_SPEC, Config.make("hip", lds_kib=kib, block_x=256), arch.get(name))


def test_template_over_the_lds_budget_is_rejected_with_figures():
    """96 KiB of LDS: over gfx942's 64 KiB (rejected, remembered, never compiled again), within
    gfx950's 160 KiB (built; the figure comes from the code object); 192 KiB is over gfx950's too."""
    if toolchain_missing():
        return
    store = default_store()
    job = _lds_job("gfx942", 96)
    with pytest.raises(OverBudgetError, match="98304 B .* budget 65536 B") as e:
        get_entry(job, store)
    assert e.value.figures["lds_bytes"] == 98304 and e.value.figures["budget_bytes"] == 65536
    rec = report(job, store)  # what prebuild reports
    assert rec["status"] == budget.REJECTED and rec["lds_bytes"] == 98304 and rec["budget_bytes"] == 65536
    runs = counters.snapshot()["compiler_runs"]
    with pytest.raises(OverBudgetError):
        get_entry(job, store)
    assert counters.snapshot()["compiler_runs"] == runs  # the rejection is in the cache

    entry, how = get_entry(_lds_job("gfx950", 96), store)
    assert how == "built" and entry.meta["status"] == budget.OK
    res = entry.meta["resources"]
    assert res["lds_bytes"] == 98304 and res["budget_bytes"] == 160 * 1024
    assert binaries.amdgpu_kernel_metadata(entry.file("kernel.hsaco").read_bytes(), "lds_hog")[
        ".group_segment_fixed_size"] == 98304
    with pytest.raises(OverBudgetError, match="196608 B") as e:
        get_entry(_lds_job("gfx950", 192), store)
    assert e.value.figures["lds_bytes"] == 196608


# ---- CK present / absent -----------------------------------------------------------------------------
def test_ck_absent_fails_for_the_real_reason_once_and_routes_to_triton(monkeypatch, caplog):
    """Seed 002: with CK switched off, the CK-based variant is unavailable because CK's headers are
    missing, recorded once (no compiler run, not retried), doctor shows Triton active for gfx942, and
    the op runs through Triton with one warning that names the reason."""
    monkeypatch.setenv("JITKERN_CK_DIR", "none")
    gfx942 = arch.get("gfx942")
    store = default_store()
    job = plan(qnr.SPEC, hip_config(gfx942), gfx942)
    with pytest.raises(RecordedBuildFailure, match="CK headers not found"):
        get_entry(job, store, record_failures=True)
    assert counters.snapshot()["compiler_runs"] == 0
    with pytest.raises(RecordedBuildFailure, match="recorded earlier"):
        get_entry(job, store, record_failures=True)
    recs = failures.failures(store)
    assert len(recs) == 1 and "CK headers not found" in recs[0]["reason"]
    if not toolchain_missing():
        assert "no HIP compiler" not in recs[0]["reason"]  # the reason is CK, not the compiler
    report = {r["variant"]: r for r in doctor.variant_report(qnr.SPEC, gfx942, store)}
    assert report["hip"]["status"] == "failed" and "CK headers not found" in report["hip"]["why"]
    assert report["triton"].get("active") and not report["hip"].get("active")

    monkeypatch.setenv("JITKERN_ARCH", "gfx942")  # CPU tensors, configs chosen as for gfx942
    caplog.set_level(logging.WARNING, logger="jitkern")
    jitkern.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        qkv = torch.randn(3, 4 * 64, generator=g)
        w = torch.ones(64)
        cs = qnr.cos_sin_table(16, 64)
        pos = torch.tensor([0, 5, 15])
        want = qnr.reference(qkv.clone(), w, w, cs, pos, 2, 1, 64)
        jitkern.ops.qk_norm_rope(qkv, w, w, cs, pos, 2, 1, 64)
        torch.testing.assert_close(qkv, want, atol=1e-5, rtol=1e-5)
    warns = [r.getMessage() for r in caplog.records if "qk_norm_rope falls back" in r.getMessage()]
    assert len(warns) == 1 and "'triton'" in warns[0] and "CK headers not found" in warns[0]


def _fake_ck(root: Path, version: str) -> Path:
    (root / "include" / "ck").mkdir(parents=True)
    (root / "include" / "ck" / "ck.hpp").write_text('#include "ck/config.h"\n')
    (root / "include" / "ck" / "config.h.in").write_text("#cmakedefine CK_USE_XDL @CK_USE_XDL@\n"
                                                          "#cmakedefine CK_USE_OCP_FP8 @CK_USE_OCP_FP8@\n"
                                                          "#cmakedefine CK_USE_FNUZ_FP8 @CK_USE_FNUZ_FP8@\n")
    (root / "include" / "ck" / "version.h.in").write_text("#define CK_VERSION_MAJOR @CMAKE_PROJECT_VERSION_MAJOR@\n")
    (root / "CMakeLists.txt").write_text(f"cmake_minimum_required(VERSION 3.14)\nset(version {version})\n")
    return root


def test_key_changes_with_ck_version_and_compiler_flags(monkeypatch, tmp_path):
    gfx942 = arch.get("gfx942")
    cfg = hip_config(gfx942)

    def planned():
        job = plan(qnr.SPEC, cfg, gfx942)
        return job.key, dict(job.parts)

    monkeypatch.setenv("JITKERN_CK_DIR", str(_fake_ck(tmp_path / "a", "1.2.0")))
    key_a, parts_a = planned()
    assert parts_a["compiler"]["ck"]["version"] == "1.2.0"
    monkeypatch.setenv("JITKERN_CK_DIR", str(_fake_ck(tmp_path / "b", "1.3.0")))
    key_b, parts_b = planned()
    assert parts_b["compiler"]["ck"]["version"] == "1.3.0" and key_b != key_a
    assert {k for k in parts_a if parts_a[k] != parts_b[k]} == {"compiler"}
    monkeypatch.setenv("JITKERN_HIPCC_FLAGS", "-DJITKERN_TEST_FLAG=1")
    key_c, parts_c = planned()
    assert key_c != key_b and "-DJITKERN_TEST_FLAG=1" in parts_c["compiler"]["flags"]
    monkeypatch.setenv("JITKERN_CK_DIR", "none")
    key_d, parts_d = planned()
    assert parts_d["compiler"]["ck"] is None and key_d not in (key_a, key_b, key_c)
    if not toolchain_missing():
        fp = parts_a["compiler"]
        assert "clang version" in fp["version"] and fp["driver"] in ("clang", "hipcc")
        assert "-mcode-object-version=5" in fp["flags"] and "--no-gpu-bundle-output" in fp["flags"]
        if fp["driver"] == "clang":
            assert re.fullmatch(r"[0-9a-f]{64}", fp["device_libs"]["ocml.bc"])


def test_ck_found_in_an_installed_amd_aiter_and_headers_generated_outside_it(monkeypatch, tmp_path):
    """An installed ``amd-aiter`` distribution is found through its metadata (nothing imported);
    config.h/version.h are generated per arch into jitkern's directory, never into CK's."""
    site = tmp_path / "site"
    (site / "amd_aiter-0.1.7.dist-info").mkdir(parents=True)
    (site / "amd_aiter-0.1.7.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: amd-aiter\nVersion: 0.1.7\n")
    root = _fake_ck(site / "aiter_meta" / "3rdparty" / "composable_kernel", "1.2.0")
    monkeypatch.delenv("JITKERN_CK_DIR", raising=False)
    monkeypatch.delenv("CK_DIR", raising=False)
    monkeypatch.syspath_prepend(str(site))
    found, why = ck.find()
    assert found is not None, why
    assert found.root == root.resolve() and found.origin == "amd-aiter 0.1.7" and found.version == "1.2.0"
    assert "aiter" not in sys.modules
    before = sorted(p.name for p in (root / "include" / "ck").iterdir())
    for name, on, off in (("gfx942", "CK_USE_FNUZ_FP8", "CK_USE_OCP_FP8"),
                          ("gfx950", "CK_USE_OCP_FP8", "CK_USE_FNUZ_FP8")):
        dest = tmp_path / f"gen-{name}"
        ck.generate(found, name, dest)
        config = (dest / "ck" / "config.h").read_text()
        assert f"#define {on} ON" in config and f"/* #undef {off} */" in config
        assert "#define CK_USE_XDL ON" in config
        assert (dest / "ck" / "version.h").read_text() == "#define CK_VERSION_MAJOR 1\n"
    assert sorted(p.name for p in (root / "include" / "ck").iterdir()) == before


def test_doctor_reports_the_amd_toolchain():
    r = subprocess.run([sys.executable, "-m", "jitkern", "doctor"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr
    for row in ("HIP compiler", "HIP headers", "AMD device libs", "Composable Kernel"):
        assert row in r.stdout
    if not toolchain_missing():
        assert "code object v5" in r.stdout
    if not ck_missing():
        assert re.search(r"Composable Kernel\s+CK \d+\.\d+\.\d+ at ", r.stdout)


def test_unavailable_without_compiler_names_what_to_install(monkeypatch, tmp_path):
    """A machine with no HIP compiler: the variant is unavailable with the remedy, nothing is run."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no clang++ on PATH
    monkeypatch.setenv("ROCM_PATH", str(tmp_path / "no-rocm"))
    monkeypatch.delenv("JITKERN_HIPCC", raising=False)
    monkeypatch.delenv("JITKERN_HIP_CLANG", raising=False)
    with pytest.raises(UnavailableError, match="no HIP compiler found .*clang-22"):
        hip.HIP.build(_lds_job("gfx942", 1))
