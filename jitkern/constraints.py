"""Tile constraints per (arch, op), declared as data, and ``JITKERN_<OP>_<PARAM>`` overrides.

Two kinds of facts decide which tile configurations an op may use on an arch:

* **Tunables** (per op, arch-independent): the values a tile parameter can take at all, e.g. gemm's
  ``block_m`` is a power of two from 16 to 256. An op declares them in ``OpSpec.tunables``.
* **Rules** (per arch and op, in ``RULES`` below, next to the arch table's budgets): caps, floors,
  pins, divisibility and dtype limits, each with the reason it exists. ``"*"`` matches any arch or op.

Every path that picks a configuration (lazy compile, autotuning, prebuild) goes through
``apply()``: pins and environment overrides are set, then candidates that break a rule are dropped.
The resource check after compilation (``jitkern.budget``) is the second gate: a configuration that
passes the rules can still be rejected for its real shared-memory use.

Environment overrides: ``JITKERN_GEMM_BLOCK_M=64`` sets ``block_m`` of every gemm candidate. A value
that is not a tunable value, or that an arch rule forbids, is a ``ConfigError`` naming the
variable, the value and what is allowed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from . import settings, state
from .errors import ConfigError

log = logging.getLogger("jitkern")


@dataclass(frozen=True)
class Rule:
    """One constraint on one parameter of ``op`` on ``arch`` (``"*"`` = any).

    Exactly the fields that are set apply: ``max``/``min`` bound the value, ``multiple_of`` requires
    divisibility, ``pin`` sets the value of every candidate (a default that a ``JITKERN_<OP>_<PARAM>``
    override may change; it never drops a candidate), ``allowed`` lists
    permitted values (dtype limits use it with ``param="dtype"``). ``why`` is shown in errors.
    """

    arch: str
    op: str
    param: str
    why: str
    max: int | None = None
    min: int | None = None
    multiple_of: int | None = None
    pin: Any = None
    allowed: tuple | None = None

    def matches(self, arch: str, op: str) -> bool:
        return self.arch in ("*", arch) and self.op in ("*", op)

    def violation(self, value) -> str | None:
        """Why ``value`` breaks this rule, or None."""
        if value is None:
            return None
        if self.allowed is not None and value not in self.allowed:
            return f"{self.param}={value!r} is not one of {', '.join(map(str, self.allowed))}"
        if self.max is not None and value > self.max:
            return f"{self.param}={value!r} is over the cap {self.max}"
        if self.min is not None and value < self.min:
            return f"{self.param}={value!r} is under the floor {self.min}"
        if self.multiple_of is not None and value % self.multiple_of:
            return f"{self.param}={value!r} is not a multiple of {self.multiple_of}"
        return None

    def describe(self) -> str:
        bits = []
        if self.allowed is not None:
            bits.append(f"one of {', '.join(map(str, self.allowed))}")
        if self.pin is not None:
            bits.append(f"= {self.pin}")
        if self.max is not None:
            bits.append(f"<= {self.max}")
        if self.min is not None:
            bits.append(f">= {self.min}")
        if self.multiple_of is not None:
            bits.append(f"a multiple of {self.multiple_of}")
        return f"{self.param} {' and '.join(bits)} on {self.arch} ({self.why})"


#: The rules. Budgets themselves (shared memory per block) live in ``jitkern.arch``; rules here
#: are what is known before compiling: tile shapes that cannot fit, or that the hardware's matrix
#: instructions or the Triton backend do not support well.
RULES: list[Rule] = [
    # Matrix instructions (wgmma, mfma, mma) take K in steps of 16 for 16-bit types.
    Rule("*", "gemm", "block_k", "tl.dot needs K tiles of at least 16", min=16, multiple_of=16),
    Rule("*", "gemm", "dtype", "fp32 accumulation of 16-bit inputs only", allowed=("bf16", "fp16")),
    # gfx942 (CDNA3, 64 KiB LDS): one 128x256 bf16 tile pair with block_k=64 alone is 48 KiB.
    Rule("gfx942", "gemm", "block_n", "64 KiB LDS per workgroup", max=256),
    # gfx950 (CDNA4, 160 KiB LDS): seed 003, a 128x512 MoE tile needed 269 KiB; cap gemm's block_n
    # the same way (the MoE ops declare their own rules with add_rules, next to their specs).
    Rule("gfx950", "gemm", "block_n", "160 KiB LDS: 128x512 tiles need ~269 KiB (seed 003)", max=256),
    # AMD wavefronts are 64 wide: more than 8 waves per workgroup for a gemm tile starves registers.
    Rule("gfx942", "gemm", "num_warps", "64-wide wavefronts: 8 waves is the useful maximum", max=8),
    Rule("gfx950", "gemm", "num_warps", "64-wide wavefronts: 8 waves is the useful maximum", max=8),
    # Hopper wgmma runs per warpgroup (4 warps).
    Rule("sm_90", "gemm", "num_warps", "wgmma is issued per warpgroup of 4 warps", multiple_of=4),
    # Triton's interpreter on the CPU: big tiles only make tests slow.
    Rule("cpu", "gemm", "block_m", "interpreter: small tiles keep CPU runs fast", max=64),
    Rule("cpu", "gemm", "block_n", "interpreter: small tiles keep CPU runs fast", max=64),
    Rule("cpu", "gemm", "block_k", "interpreter: small tiles keep CPU runs fast", max=64),
]


def add_rules(*rules: Rule) -> None:
    """Declare rules for an op (third-party ops call this next to their spec)."""
    for r in rules:
        if not isinstance(r, Rule):
            raise ConfigError(f"add_rules() takes Rule objects, got {type(r).__name__}")
    RULES.extend(rules)


def rules_for(arch: str, op: str) -> list[Rule]:
    return list(_rules(arch, op)[0])


#: (arch, op) -> (its rules in order, its pins by parameter); ``_configs``: (arch, op, Config) -> its
#: violations; ``_applied``: ``apply``'s arguments -> its result. Pure functions of ``RULES`` (and of
#: their arguments), memoised for the list ``_memo_of`` holds a copy of: checked on every use, since
#: ``RULES`` is a public list that ``add_rules`` extends and tests replace or rebind. Environment
#: overrides are read on every call and are part of ``_applied``'s key.
_memo: dict = {}
_configs: dict = {}
_applied: dict = {}
_memo_of: list = []
_MEMO_MAX = 4096


def _rules(arch: str, op: str) -> tuple:
    global _memo_of
    if RULES != _memo_of:  # element identity first (C speed): a new, removed or replaced rule clears it
        _forget()
        _memo_of = list(RULES)
    got = _memo.get((arch, op))
    if got is None:
        rules = tuple(r for r in _memo_of if r.matches(arch, op))
        got = _memo[(arch, op)] = (rules, {r.param: r.pin for r in rules if r.pin is not None})
    return got


@state.on_reset
def _forget() -> None:
    global _memo_of
    _memo.clear()
    _configs.clear()
    _applied.clear()
    _memo_of = []


def violations(arch: str, op: str, params: Mapping[str, Any]) -> list[str]:
    """Every rule of (arch, op) that ``params`` breaks, as readable reasons. Empty: allowed."""
    out = []
    for r in _rules(arch, op)[0]:
        if r.param in params:
            v = r.violation(params[r.param])
            if v:
                out.append(f"{v} on {arch} ({r.why})")
    return out


def config_violations(arch: str, op: str, config) -> list[str]:
    """``violations`` of a ``jitkern.spec.Config``'s parameters (memoised: a Config is hashable; the
    dispatcher asks this for every launch of every candidate of every new call signature)."""
    _rules(arch, op)  # drops the memo if RULES changed
    memo = (arch, op, config)
    try:
        got = _configs.get(memo)
    except TypeError:  # a parameter value that cannot be hashed
        return violations(arch, op, config.p)
    if got is None:
        if len(_configs) >= _MEMO_MAX:
            _configs.clear()
        got = _configs[memo] = tuple(violations(arch, op, config.p))
    return list(got)


# ---- tunables and environment overrides ---------------------------------------------------------
def env_name(op: str, param: str) -> str:
    return f"JITKERN_{op.upper()}_{param.upper()}"


def _parse(var: str, raw: str, domain: tuple):
    text = raw.strip()
    allowed = ", ".join(map(str, domain))
    if all(isinstance(d, bool) for d in domain):
        low = text.lower()
        if low in ("1", "true", "on", "yes"):
            return True
        if low in ("0", "false", "off", "no"):
            return False
        raise ConfigError(f"{var}={raw!r} is not allowed; expected one of: 1, 0, true, false")
    if all(isinstance(d, int) for d in domain):
        try:
            value = int(text, 10)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not a whole number; allowed values: {allowed}") from None
    else:
        value = text
    if value not in domain:
        raise ConfigError(f"{var}={raw!r} is not allowed; allowed values: {allowed}")
    return value


def env_overrides(arch: str, op: str, tunables: Mapping[str, tuple], environ: Mapping[str, str] | None = None
                  ) -> dict[str, Any]:
    """``JITKERN_<OP>_<PARAM>`` values for ``op`` on ``arch``, validated against the op's tunables and
    the arch rules. Raises ``ConfigError`` naming the variable, the value and what is allowed."""
    prefix = f"JITKERN_{op.upper()}_"
    env = settings.tile_overrides(op) if environ is None else environ
    out: dict[str, Any] = {}
    known = {env_name(op, p): p for p in tunables}
    for var, raw in env.items():
        if not var.startswith(prefix) or raw.strip() == "":
            continue
        param = known.get(var)
        if param is None:
            raise ConfigError(f"{var} is not a tunable of op {op!r}; the variables it reads are: "
                              f"{', '.join(sorted(known))}")
        value = _parse(var, raw, tuple(tunables[param]))
        for r in _rules(arch, op)[0]:
            if r.param == param:
                v = r.violation(value)
                if v:
                    ok = [d for d in tunables[param] if r.violation(d) is None]
                    raise ConfigError(f"{var}={raw!r} is not allowed on {arch}: {v} ({r.why}); "
                                      f"allowed on {arch}: {', '.join(map(str, ok)) or 'none'}")
        out[param] = value
    return out


def apply(arch: str, op: str, candidates: Iterable[Mapping[str, Any]], tunables: Mapping[str, tuple],
          environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Candidates in order, with pins and env overrides set, rule breakers dropped, duplicates removed.

    Raises ``ConfigError`` for an invalid override, or when no candidate is left (naming why the
    first one was dropped).
    """
    overrides = env_overrides(arch, op, tunables, environ)  # read (and validated) on every call
    pins = _rules(arch, op)[1]
    candidates = list(candidates)
    memo = (arch, op, tuple(tunables), tuple(overrides.items()), tuple(tuple(c.items()) for c in candidates))
    try:
        got = _applied.get(memo)
    except TypeError:  # a value that cannot be hashed: not memoised
        memo = got = None
    if got is not None:
        return [dict(p) for p in got]
    out = _apply(arch, op, candidates, tunables, overrides, pins)
    if memo is not None:
        if len(_applied) >= _MEMO_MAX:
            _applied.clear()
        _applied[memo] = tuple(dict(p) for p in out)
    return out


def _apply(arch: str, op: str, candidates: list, tunables: Mapping[str, tuple], overrides: dict,
           pins: dict) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen = set()
    first_reason = None
    for c in candidates:
        params = {**c}
        params.update({k: v for k, v in pins.items() if k in params or k in tunables})
        params.update(overrides)
        bad = violations(arch, op, params)
        if bad:
            log.debug("jitkern: %s on %s: candidate %s dropped: %s", op, arch, params, "; ".join(bad))
            first_reason = first_reason or bad[0]
            continue
        ident = tuple(sorted(params.items()))
        if ident not in seen:
            seen.add(ident)
            out.append(params)
    if not out:
        why = f" (first candidate: {first_reason})" if first_reason else ""
        raise ConfigError(f"no {op} configuration is allowed on {arch}{why}; check the JITKERN_{op.upper()}_* "
                          f"variables and the rules in jitkern.constraints")
    return out


__all__ = ["Rule", "RULES", "add_rules", "rules_for", "violations", "config_violations", "env_name", "env_overrides",
           "apply"]
