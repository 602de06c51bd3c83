"""Arch tile rules and JITKERN_<OP>_<PARAM> overrides (jitkern.constraints), with gemm's candidates.

No compiles here: these are the checks made before anything is built.
"""
import pytest

from jitkern import constraints
from jitkern.constraints import Rule
from jitkern.errors import ConfigError
from jitkern.library import gemm

TUNABLES = {"block_m": (16, 32, 64, 128, 256), "block_n": (16, 32, 64, 128, 256, 512), "num_warps": (2, 4, 8)}


@pytest.fixture
def extra_rules():
    """Rules for a throwaway op, removed after the test."""
    before = list(constraints.RULES)
    yield constraints.add_rules
    constraints.RULES[:] = before


def test_rule_kinds(extra_rules):
    extra_rules(
        Rule("gfx950", "toy", "block_n", "LDS", max=256),
        Rule("*", "toy", "block_m", "mma shape", min=32, multiple_of=32),
        Rule("*", "toy", "dtype", "16-bit only", allowed=("bf16", "fp16")),
    )
    assert constraints.violations("gfx950", "toy", {"block_n": 256, "block_m": 64, "dtype": "bf16"}) == []
    bad = constraints.violations("gfx950", "toy", {"block_n": 512, "block_m": 48, "dtype": "fp32"})
    text = " | ".join(bad)
    assert len(bad) == 3
    assert "block_n=512 is over the cap 256 on gfx950" in text
    assert "block_m=48 is not a multiple of 32" in text
    assert "dtype='fp32' is not one of bf16, fp16" in text
    assert constraints.violations("gfx950", "toy", {"block_m": 16})[0].startswith("block_m=16 is under the floor 32")
    # the gfx950 cap is not applied on sm_90
    assert constraints.violations("sm_90", "toy", {"block_n": 512}) == []


def test_apply_drops_rule_breakers_in_order_and_applies_pins(extra_rules):
    extra_rules(Rule("gfx950", "toy", "block_n", "LDS", max=256),
                Rule("gfx950", "toy", "num_warps", "pinned", pin=4))
    cands = [dict(block_m=128, block_n=512, num_warps=8), dict(block_m=128, block_n=256, num_warps=8),
             dict(block_m=64, block_n=256, num_warps=2)]
    got = constraints.apply("gfx950", "toy", cands, TUNABLES, environ={})
    assert got == [dict(block_m=128, block_n=256, num_warps=4), dict(block_m=64, block_n=256, num_warps=4)]
    # sm_90 has no rule: all three, unchanged
    assert constraints.apply("sm_90", "toy", cands, TUNABLES, environ={}) == cands


def test_env_override_valid_sets_every_candidate():
    env = {"JITKERN_TOY_BLOCK_M": "64", "JITKERN_TOY_NUM_WARPS": " 4 "}
    cands = [dict(block_m=128, block_n=128, num_warps=8), dict(block_m=32, block_n=64, num_warps=2)]
    got = constraints.apply("sm_90", "toy", cands, TUNABLES, environ=env)
    assert got == [dict(block_m=64, block_n=128, num_warps=4), dict(block_m=64, block_n=64, num_warps=4)]


def test_env_override_may_change_a_pin(extra_rules):
    extra_rules(Rule("gfx950", "toy", "block_m", "seed 003 default", pin=64))
    cands = [dict(block_m=128, block_n=128, num_warps=8)]
    assert constraints.apply("gfx950", "toy", cands, TUNABLES, environ={})[0]["block_m"] == 64
    assert constraints.apply("gfx950", "toy", cands, TUNABLES,
                             environ={"JITKERN_TOY_BLOCK_M": "32"})[0]["block_m"] == 32


@pytest.mark.parametrize("var,value,expect", [
    ("JITKERN_TOY_BLOCK_M", "48", "JITKERN_TOY_BLOCK_M='48' is not allowed; allowed values: 16, 32, 64, 128, 256"),
    ("JITKERN_TOY_BLOCK_M", "big", "JITKERN_TOY_BLOCK_M='big' is not a whole number; allowed values: 16, 32"),
    ("JITKERN_TOY_BLOCK_M", "0x40", "is not a whole number"),
    ("JITKERN_TOY_BLOCK_Q", "64", "JITKERN_TOY_BLOCK_Q is not a tunable of op 'toy'"),
])
def test_env_override_invalid(var, value, expect):
    with pytest.raises(ConfigError) as e:
        constraints.env_overrides("sm_90", "toy", TUNABLES, environ={var: value})
    assert expect in str(e.value)


def test_env_override_over_the_arch_cap_names_what_is_allowed_there(extra_rules):
    extra_rules(Rule("gfx950", "toy", "block_n", "160 KiB LDS", max=256))
    env = {"JITKERN_TOY_BLOCK_N": "512"}
    with pytest.raises(ConfigError) as e:
        constraints.env_overrides("gfx950", "toy", TUNABLES, environ=env)
    msg = str(e.value)
    assert "JITKERN_TOY_BLOCK_N='512' is not allowed on gfx950" in msg
    assert "over the cap 256" in msg and "160 KiB LDS" in msg
    assert "allowed on gfx950: 16, 32, 64, 128, 256" in msg
    # the same value is fine where the cap does not apply
    assert constraints.env_overrides("sm_90", "toy", TUNABLES, environ=env) == {"block_n": 512}


# ---- gemm's rules and candidates ----------------------------------------------------------------
def test_gemm_candidates_respect_arch_caps_and_tunables():
    for arch in ("gfx942", "gfx950", "sm_90", "cpu"):
        for b in ("m16", "m64", "m128", "large"):
            for t in gemm.candidates(arch, "bf16", b):
                # the six base parameters; the Hopper (TMA) ones and split-K only on sm_90
                assert set(gemm.TILE_PARAMS) <= set(t) <= set(gemm.TILE_PARAMS) | set(gemm.HOPPER_PARAMS) | {"split_k"}
                assert not t.get("tma") or arch == "sm_90", (arch, b, t)
                assert "split_k" not in t or (arch == "sm_90" and b != "large"), (arch, b, t)
                for k, v in t.items():
                    assert v in gemm.TUNABLES[k], (arch, b, t)
                assert constraints.violations(arch, "gemm", dict(t, dtype="bf16")) == []
    assert all(t["block_n"] <= 64 and t["block_m"] <= 64 for t in gemm.candidates("cpu", "bf16", "large"))
    assert all(t["num_warps"] % 4 == 0 for t in gemm.candidates("sm_90", "fp16", "large"))


def test_gemm_env_override(monkeypatch):
    monkeypatch.setenv("JITKERN_GEMM_BLOCK_K", "32")
    tiles = gemm.candidates("sm_90", "bf16", "large")
    assert tiles and all(t["block_k"] == 32 for t in tiles)
    monkeypatch.setenv("JITKERN_GEMM_BLOCK_K", "24")
    with pytest.raises(ConfigError, match=r"JITKERN_GEMM_BLOCK_K='24' is not allowed; allowed values: 16, 32"):
        gemm.candidates("sm_90", "bf16", "large")
    monkeypatch.setenv("JITKERN_GEMM_BLOCK_K", "32")
    monkeypatch.setenv("JITKERN_GEMM_BLOCK_N", "512")
    with pytest.raises(ConfigError, match=r"JITKERN_GEMM_BLOCK_N='512' is not allowed on gfx950: .*seed 003"):
        gemm.candidates("gfx950", "bf16", "large")


def test_gemm_dtype_limit():
    assert constraints.violations("sm_90", "gemm", {"dtype": "fp32"})
    with pytest.raises(ConfigError, match="no gemm configuration is allowed on sm_90"):
        constraints.apply("sm_90", "gemm", [dict(block_k=64, dtype="fp32")], gemm.TUNABLES, environ={})


# ---- memoised rules (a warm process decides many signatures) --------------------------------------
def _apply_uncached(arch, op, cands, tunables, environ):
    """``apply`` as it was before it was memoised: every call from scratch."""
    constraints._forget()
    return constraints.apply(arch, op, cands, tunables, environ=environ)


def test_memoised_rules_follow_every_change_of_RULES(extra_rules, monkeypatch):
    cands = [dict(block_m=128, block_n=512, num_warps=8), dict(block_m=64, block_n=256, num_warps=2)]
    cfg = gemm.config("bf16", False, True, dict(block_m=128, block_n=512, block_k=64, group_m=8, num_warps=8,
                                                num_stages=3))
    assert constraints.apply("gfx950", "toy", cands, TUNABLES, environ={}) == cands
    assert constraints.config_violations("gfx950", "toy", cfg) == []
    extra_rules(Rule("gfx950", "toy", "block_n", "LDS", max=256))  # appended
    assert constraints.apply("gfx950", "toy", cands, TUNABLES, environ={}) == [cands[1]]
    assert "block_n=512 is over the cap 256" in constraints.config_violations("gfx950", "toy", cfg)[0]
    assert [r.why for r in constraints.rules_for("gfx950", "toy")] == ["LDS"]
    constraints.RULES[-1] = Rule("gfx950", "toy", "block_n", "LDS", max=128)  # replaced in place
    with pytest.raises(ConfigError, match="over the cap 128"):
        constraints.apply("gfx950", "toy", cands, TUNABLES, environ={})
    monkeypatch.setattr(constraints, "RULES", [r for r in constraints.RULES if r.op != "toy"])  # rebound
    assert constraints.apply("gfx950", "toy", cands, TUNABLES, environ={}) == cands
    assert constraints.config_violations("gfx950", "toy", cfg) == [] and constraints.rules_for("gfx950", "toy") == []


def test_memoised_apply_reads_overrides_every_call_and_returns_fresh_dicts(monkeypatch):
    cands = [dict(block_m=128, block_n=128, num_warps=8)]
    first = constraints.apply("sm_90", "toy", cands, TUNABLES)
    assert first == cands
    first[0]["block_m"] = 16  # a caller changing what it got changes nothing for the next caller
    assert constraints.apply("sm_90", "toy", cands, TUNABLES) == cands
    monkeypatch.setenv("JITKERN_TOY_BLOCK_M", "64")
    assert constraints.apply("sm_90", "toy", cands, TUNABLES) == [dict(block_m=64, block_n=128, num_warps=8)]
    monkeypatch.setenv("JITKERN_TOY_BLOCK_M", "48")
    with pytest.raises(ConfigError, match="JITKERN_TOY_BLOCK_M='48'"):
        constraints.apply("sm_90", "toy", cands, TUNABLES)
    monkeypatch.delenv("JITKERN_TOY_BLOCK_M")
    with constraints.settings.override(tiles={"toy": {"num_warps": 2}}):
        assert constraints.apply("sm_90", "toy", cands, TUNABLES)[0]["num_warps"] == 2
    assert constraints.apply("sm_90", "toy", cands, TUNABLES) == cands


def test_gemm_candidates_are_the_same_memoised_or_not():
    for arch in ("gfx942", "gfx950", "sm_90", "cpu"):
        for b in ("m16", "m64", "m128", "large"):
            for b_trans in (False, True):
                listed = [dict(t, dtype="bf16") for t in gemm.HOPPER_CANDIDATES[b] + gemm.CANDIDATES[b]]
                want = _apply_uncached(arch, "gemm", listed, gemm.TUNABLES, {})
                for _ in range(2):  # a miss, then a hit
                    assert constraints.apply(arch, "gemm", listed, gemm.TUNABLES, environ={}) == want
                assert gemm.candidates(arch, "bf16", b, b_trans=b_trans) == gemm.candidates(arch, "bf16", b,
                                                                                            b_trans=b_trans)
