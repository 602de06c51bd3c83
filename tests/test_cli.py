"""The `jitkern` command line: bad arguments are a clean message and exit status 2, never a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jitkern.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,says", [
    (["prebuild", "--arch", "gfx9999"], "unknown arch 'gfx9999'; known arches: gfx942"),
    (["prebuild", "--arch", ""], "no arch named"),
    (["prebuild", "--arch", "cpu", "--jobs", "0"], "expected a positive whole number"),
    (["prebuild", "--arch", "cpu", "--op", "no_such_op"], "unknown op 'no_such_op'; available ops: "),
    (["cache", "prune", "--max-size", "lots"], "'lots' is not a size"),
    (["cache", "prune"], "--max-size"),
    (["cache", "frobnicate"], "invalid choice"),
    ([], "COMMAND"),
    (["prebuild", "--no-such-flag"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_a_message(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_prebuild_without_arch_and_without_gpu_asks_for_arch(monkeypatch, capsys):
    import jitkern.arch

    monkeypatch.delenv("JITKERN_ARCH", raising=False)
    try:
        jitkern.arch.detect()
        pytest.skip("a GPU is present: prebuild defaults to its arch")
    except jitkern.NoDeviceError:
        pass
    assert main(["prebuild"]) == 2
    assert "--arch gfx942,gfx950,sm_90" in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module_and_errors_cleanly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JITKERN_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "jitkern", "prebuild", "--arch", "sm_91"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown arch 'sm_91'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "jitkern", "--version"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("jitkern ")


def test_list_names_ops_variants_parameters_and_arches(capsys):
    assert main(["list", "--json"]) == 0
    ops = {o["op"]: o for o in json.loads(capsys.readouterr().out)}
    rms = ops["rms_norm"]
    assert [v["name"] for v in rms["variants"]][0] == "triton"
    assert set(rms["variants"][0]["params"]["dtype"]) == {"bf16", "fp16", "fp32"}
    import jitkern.library.rms_norm as rn
    from jitkern import arch

    assert rms["configs_per_arch"]["gfx942"] == len(list(rn.configs(arch.get("gfx942"))))
    assert {"gfx942", "gfx950", "sm_90"} <= set(rms["configs_per_arch"])
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "rms_norm" in text and "variant triton" in text


def test_doctor_reports_toolchains_and_cache_layers(tmp_path, monkeypatch, capsys):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    (ro / "v1" / "entries").mkdir(parents=True)
    monkeypatch.setenv("JITKERN_CACHE_DIR", os.pathsep.join([str(rw), str(ro)]))
    ro.chmod(0o555)
    (ro / "v1").chmod(0o555)
    try:
        assert main(["doctor", "--json"]) == 0
    finally:
        (ro / "v1").chmod(0o755)
        ro.chmod(0o755)
    report = json.loads(capsys.readouterr().out)
    tools = report["toolchains"]
    assert tools["triton"] and tools["jitkern"]
    layers = report["cache"]["layers"]
    assert [x["path"] for x in layers] == [str(rw), str(ro)]
    assert layers[0]["writable"] and layers[0]["receives_new_entries"]
    if os.geteuid() != 0:  # root may write anywhere: only then is the mode what decides
        assert not layers[1]["writable"]
    assert not rw.exists(), "doctor must not create cache directories"
