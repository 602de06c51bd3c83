"""The settings registry: one parser per type, every JITKERN_* read through it, overrides, docs."""
import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jitkern import settings
from jitkern.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---- parsers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("2GB", 2 * 10 ** 9), ("2GiB", 2 * 2 ** 30), ("2G", 2 * 2 ** 30), ("500MB", 500 * 10 ** 6),
    ("500MiB", 500 * 2 ** 20), ("1KB", 1000), ("1kib", 1024), ("100K", 102400), ("4096", 4096),
    ("4096B", 4096), ("1.5KB", 1500), ("1.5GiB", 3 * 2 ** 29), (" 3 TB ", 3 * 10 ** 12), ("1TiB", 2 ** 40),
])
def test_sizes_are_exact_decimal_and_binary(text, want):
    assert settings.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "lots", "2 GBs", "-1", "1e3", "GB", "2Gb0", "0x10"])
def test_bad_sizes_name_the_value_and_the_units(text):
    with pytest.raises(ConfigError, match=r"is not a size.*KB/MB/GB/TB \(powers of 1000\)"):
        settings.parse_size(text, "JITKERN_X")


@pytest.mark.parametrize("text,want", [("1", True), ("TRUE", True), ("on", True), ("Yes", True),
                                       ("0", False), ("false", False), ("OFF", False), ("no", False)])
def test_booleans(text, want):
    assert settings.parse_bool(text) is want


@pytest.mark.parametrize("text,want", [("600", 600.0), ("10m", 600.0), ("1.5h", 5400.0), ("250ms", 0.25),
                                       ("5s", 5.0), ("0", 0.0)])
def test_durations(text, want):
    assert settings.parse_duration(text) == want


def test_inf_only_where_allowed():
    assert settings.parse_duration("inf", allow_inf=True) == math.inf
    with pytest.raises(ConfigError, match="not a duration"):
        settings.parse_duration("inf")
    for bad in ("nan", "-5", "ten", "1e", "5x"):
        with pytest.raises(ConfigError, match=re.escape(f"X={bad!r} is not a duration")):
            settings.parse_duration(bad, "X", allow_inf=True)


# ---- environment reads ---------------------------------------------------------------------------
@pytest.mark.parametrize("var", ["JITKERN_DIRECT_LAUNCH", "JITKERN_AUTOTUNE"])
def test_garbage_boolean_is_an_error_naming_variable_value_and_choices(var, monkeypatch):
    monkeypatch.setenv(var, "garbage")
    name = var[len("JITKERN_"):].lower()
    with pytest.raises(ConfigError, match=f"{var}='garbage' is not a boolean; allowed: 1, true, on, yes"):
        settings.get(name)


def test_direct_launch_garbage_is_not_on(monkeypatch):
    from jitkern import launcher

    monkeypatch.setenv("JITKERN_DIRECT_LAUNCH", "garbage")
    with pytest.raises(ConfigError, match="JITKERN_DIRECT_LAUNCH"):
        launcher.direct_enabled()
    monkeypatch.setenv("JITKERN_DIRECT_LAUNCH", "off")
    assert launcher.direct_enabled() is False
    monkeypatch.delenv("JITKERN_DIRECT_LAUNCH")
    assert launcher.direct_enabled() is True


def test_values_are_read_when_used_not_at_import(monkeypatch):
    monkeypatch.setenv("JITKERN_ARCH", "gfx942")
    assert settings.get("arch") == "gfx942"
    monkeypatch.setenv("JITKERN_ARCH", "sm_90")
    assert settings.get("arch") == "sm_90"
    monkeypatch.delenv("JITKERN_ARCH")
    assert settings.get("arch") is None and settings.source("arch") == "default"


def test_import_reads_no_environment_and_has_no_side_effects(tmp_path):
    code = ("import os, sys\n"
            "import jitkern.settings, jitkern\n"
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules\n"
            "print(sorted(m for m in sys.modules if m.startswith('jitkern')))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JITKERN_CACHE_DIR": "", "JITKERN_DEBUG": "garbage"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # bad values in the environment do not break the import


def test_empty_cache_dir_is_an_error_not_the_default_cache(monkeypatch):
    from jitkern import cache

    monkeypatch.setenv("JITKERN_CACHE_DIR", "")
    with pytest.raises(ConfigError, match="JITKERN_CACHE_DIR is set but empty"):
        cache.configured_layers()
    monkeypatch.setenv("JITKERN_CACHE_DIR", "   ")
    with pytest.raises(ConfigError, match="set but empty"):
        cache.default_store()
    with pytest.raises(ConfigError, match="cache directory given is empty"):
        cache.configured_layers("")
    monkeypatch.delenv("JITKERN_CACHE_DIR")
    assert cache.configured_layers() == [cache.default_root()]


def test_empty_remote_key_is_an_error_not_unsigned(monkeypatch):
    monkeypatch.setenv("JITKERN_REMOTE_CACHE_KEY", "")
    with pytest.raises(ConfigError, match="JITKERN_REMOTE_CACHE_KEY is set but empty"):
        settings.get("remote_cache_key")


def test_other_empty_values_mean_unset(monkeypatch):
    monkeypatch.setenv("JITKERN_BUILD_TIMEOUT", "")
    monkeypatch.setenv("JITKERN_AUTOTUNE", " ")
    assert settings.get("build_timeout") == 600.0 and settings.get("autotune") is False
    assert settings.source("build_timeout") == "default"


def test_cache_dir_layers_split_on_pathsep(monkeypatch, tmp_path):
    from jitkern import cache

    monkeypatch.setenv("JITKERN_CACHE_DIR", f"{tmp_path}/a{os.pathsep}{tmp_path}/b{os.pathsep}")
    assert cache.configured_layers() == [tmp_path / "a", tmp_path / "b"]


def test_redzone_bytes_is_a_size(monkeypatch):
    from jitkern import redzone

    monkeypatch.setenv("JITKERN_REDZONE_BYTES", "4KiB")
    assert redzone.guard_bytes() == 4096
    monkeypatch.setenv("JITKERN_REDZONE_BYTES", "1000")
    assert redzone.guard_bytes() == 1024
    monkeypatch.setenv("JITKERN_REDZONE_BYTES", "0")
    with pytest.raises(ConfigError, match="JITKERN_REDZONE_BYTES='0' must be a positive size"):
        redzone.guard_bytes()


def test_debug_switches_are_checked(monkeypatch):
    from jitkern import redzone

    monkeypatch.setenv("JITKERN_DEBUG", "Redzone, checks")
    assert redzone.enabled()
    monkeypatch.setenv("JITKERN_DEBUG", "redzon")
    with pytest.raises(ConfigError, match="unknown switch 'redzon'; allowed: redzone, checks"):
        redzone.enabled()


def test_flags_and_timeouts(monkeypatch):
    from jitkern.builders import cpp

    monkeypatch.setenv("JITKERN_HIPCC_FLAGS", "-O3 '-DX=a b'")
    assert cpp._env_flags("JITKERN_HIPCC_FLAGS") == ["-O3", "-DX=a b"]
    monkeypatch.setenv("JITKERN_BUILD_TIMEOUT", "2m")
    assert cpp.build_timeout() == 120.0
    monkeypatch.setenv("JITKERN_BUILD_TIMEOUT", "abc")
    with pytest.raises(ConfigError, match="JITKERN_BUILD_TIMEOUT='abc'"):
        cpp.build_timeout()


# ---- overrides -----------------------------------------------------------------------------------
def test_override_wins_over_env_nests_and_restores(monkeypatch, tmp_path):
    monkeypatch.setenv("JITKERN_AUTOTUNE", "1")
    assert settings.get("autotune") is True and settings.source("autotune") == "env"
    with settings.override(autotune=False, cache_dir=tmp_path):
        assert settings.get("autotune") is False and settings.source("autotune") == "override"
        assert settings.get("cache_dir") == (str(tmp_path),)
        with settings.override(autotune="on", arch=None):
            assert settings.get("autotune") is True
            assert settings.get("arch") is None
        assert settings.get("autotune") is False
    assert settings.get("autotune") is True
    assert settings.get("cache_dir") == (os.environ["JITKERN_CACHE_DIR"],)


def test_override_unset_hides_the_environment(monkeypatch):
    monkeypatch.setenv("JITKERN_ARCH", "gfx942")
    with settings.override(arch=None):
        assert settings.get("arch") is None
        assert settings.child_environ().get("JITKERN_ARCH") is None
    assert settings.get("arch") == "gfx942"


def test_override_checks_values_before_the_block():
    ran = []
    with pytest.raises(ConfigError, match="JITKERN_LOCK_TIMEOUT='soon' is not a duration"):
        with settings.override(lock_timeout="soon"):
            ran.append(1)
    with pytest.raises(ConfigError, match="expected a bool"):
        with settings.override(autotune=3):
            ran.append(1)
    with pytest.raises(ConfigError, match="no setting named 'cach_dir'"):
        with settings.override(cach_dir="/tmp"):
            ran.append(1)
    assert not ran


def test_override_reaches_the_modules_and_child_processes(tmp_path):
    from jitkern import cache, constraints, locks

    with settings.override(cache_dir=[tmp_path / "a", tmp_path / "b"], lock_timeout=5,
                           tiles={"gemm": {"block_m": 64}}):
        assert cache.configured_layers() == [tmp_path / "a", tmp_path / "b"]
        assert locks.lock_timeout() == 5.0
        assert constraints.env_overrides("gfx942", "gemm", {"block_m": (32, 64, 128)}) == {"block_m": 64}
        env = settings.child_environ({})
        assert env == {"JITKERN_CACHE_DIR": f"{tmp_path}/a{os.pathsep}{tmp_path}/b",
                       "JITKERN_LOCK_TIMEOUT": "5.0", "JITKERN_GEMM_BLOCK_M": "64"}
    assert constraints.env_overrides("gfx942", "gemm", {"block_m": (32, 64, 128)}) == {}


def test_tile_override_through_python_is_validated_like_the_env():
    from jitkern import constraints

    with settings.override(tiles={"gemm": {"block_m": 3}}):
        with pytest.raises(ConfigError, match="JITKERN_GEMM_BLOCK_M='3' is not allowed; allowed values: 32, 64"):
            constraints.env_overrides("gfx942", "gemm", {"block_m": (32, 64, 128)})


# ---- every JITKERN_* read goes through the registry ----------------------------------------------
def test_no_module_reads_a_jitkern_variable_from_os_environ():
    """Walk the package's source: os.environ / os.getenv may only be used with non-JITKERN names."""
    offenders = []
    for path in sorted((REPO / "jitkern").rglob("*.py")):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                target = ast.unparse(node.func.value)
                arg = node.args[0]
                if (target == "os.environ" and node.func.attr in ("get", "pop", "setdefault")
                        or ast.unparse(node.func) == "os.getenv"):
                    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                            and not arg.value.startswith("JITKERN_")):
                        if not (isinstance(arg, ast.Name) and arg.id == "env"):  # cpp's CUDA_HOME/CK_DIR loop
                            offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                if isinstance(node.ctx, ast.Load):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "read these through jitkern.settings:\n" + "\n".join(offenders)


def test_every_jitkern_variable_named_in_the_package_is_declared():
    declared = {s.env for s in settings.registry().values()}
    named = set()
    for path in (REPO / "jitkern").rglob("*.py"):
        named |= set(re.findall(r"\bJITKERN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    # tile overrides (JITKERN_<OP>_<PARAM>) belong to their op; the registry declares the family
    from jitkern import registry

    ops = tuple(f"JITKERN_{name.upper()}_" for name in registry.names())
    undeclared = sorted(n for n in named - declared if not n.startswith(ops) and n not in ("JITKERN_OP",))
    assert not undeclared, f"declare these in jitkern/settings.py: {undeclared}"


# ---- documentation -------------------------------------------------------------------------------
def test_docs_settings_md_matches_the_registry():
    doc = REPO / "docs" / "settings.md"
    assert doc.read_text() == settings.markdown(), \
        "regenerate: python -m jitkern.settings --markdown > docs/settings.md"


def test_describe_reports_value_and_source_and_hides_secrets(monkeypatch):
    monkeypatch.setenv("JITKERN_REMOTE_CACHE_KEY", "hunter2")
    monkeypatch.setenv("JITKERN_LOCK_TIMEOUT", "garbage")
    rows = {r["env"]: r for r in settings.describe()}
    assert rows["JITKERN_REMOTE_CACHE_KEY"]["value"] == "(set)" and "hunter2" not in str(rows)
    assert rows["JITKERN_LOCK_TIMEOUT"]["source"] == "env"
    assert "is not a duration" in rows["JITKERN_LOCK_TIMEOUT"]["value"]["error"]
    assert rows["JITKERN_AUTOTUNE"] == {**rows["JITKERN_AUTOTUNE"], "value": False, "source": "default"}


def test_environ_prefixed_reads_the_environment_as_it_is_now(monkeypatch):
    from jitkern import key

    monkeypatch.setenv("JKTEST_A", "1")
    monkeypatch.setenv("JKTEST_B", "two words")
    monkeypatch.setenv("OTHER_JKTEST_C", "3")
    assert settings.environ_prefixed("JKTEST_") == {"JKTEST_A": "1", "JKTEST_B": "two words"}
    assert settings.environ_prefixed(("JKTEST_B", "OTHER_")) == {"JKTEST_B": "two words", "OTHER_JKTEST_C": "3"}
    want = {k: v for k, v in os.environ.items() if k.startswith(("JKTEST_", "OTHER_"))}
    assert settings.environ_prefixed(("JKTEST_", "OTHER_")) == want
    monkeypatch.delenv("JKTEST_A")
    assert settings.environ_prefixed("JKTEST_") == {"JKTEST_B": "two words"}
    # the codegen environment in every key, and the tile overrides, are read through it
    monkeypatch.setenv("TRITON_JKTEST_FLAG", "1")
    assert key.codegen_env()["TRITON_JKTEST_FLAG"] == "1"
    monkeypatch.setenv("JITKERN_GEMM_BLOCK_M", "64")
    monkeypatch.setenv("JITKERN_GEMM_BLOCK_N", " ")
    assert settings.tile_overrides("gemm") == {"JITKERN_GEMM_BLOCK_M": "64"}
