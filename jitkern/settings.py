"""Every ``JITKERN_*`` setting, declared once: name, type, default, parsing rule and help.

Read a setting with ``settings.get("cache_dir")``. Values are read lazily, on every ``get``: nothing
is read at import, and a change to the environment applies to the next read. Set them from Python (tests,
embedding) with the ``override`` context manager::

    with jitkern.settings.override(cache_dir="/tmp/jk", direct_launch=False):
        ...

An override wins over the environment, for this process only (it is process-wide, not per thread);
``override(x=None)`` means "as if unset": the default applies even if the environment sets it.
``child_environ()`` gives a subprocess environment that carries the active overrides.

Parsing rules (one parser per type, shared by every setting):

- **bool**: ``1, true, on, yes`` / ``0, false, off, no`` (any case). Anything else is a ``ConfigError``.
- **size** (bytes): a number with an optional unit. Decimal units are powers of 10 (``KB`` = 1000,
  ``MB`` = 10**6, ``GB`` = 10**9, ``TB`` = 10**12); binary units are powers of 2 (``KiB`` = 1024,
  ``MiB``, ``GiB``, ``TiB``); a bare ``K``/``M``/``G``/``T`` is binary, as in ``du -h`` and ``sort -h``.
  ``B`` is optional. Fractions are rounded to the nearest byte: ``1.5KB`` = 1500.
- **duration** (seconds): a number with an optional unit ``ms``, ``s``, ``m``, ``h``; ``inf`` where
  the setting allows waiting for ever.
- **empty values**: a variable set to the empty string (or only spaces) counts as unset, so the
  default applies -- except for settings marked *empty is an error* (``JITKERN_CACHE_DIR``,
  ``JITKERN_REMOTE_CACHE_KEY``), where an empty value is most likely an unset shell variable and
  falling back to the default would act on the wrong cache or turn signing off. Those raise a
  ``ConfigError`` telling you to unset the variable or give it a value.

Every bad value raises ``jitkern.errors.ConfigError`` naming the variable, the value and what is
allowed. ``jitkern config`` prints every setting with its effective value and where it came from;
docs/settings.md is generated from this table (``python -m jitkern.settings --markdown``).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator, Mapping

from .errors import ConfigError

PREFIX = "JITKERN_"
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


# ---- parsers (one per type) ----------------------------------------------------------------------
def parse_bool(text: str, what: str = "value") -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{what}={text!r} is not a boolean; allowed: {', '.join(_TRUE)} (on) or "
                      f"{', '.join(_FALSE)} (off)")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1,
               "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
               "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
               "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_size(text: str, what: str = "size") -> int:
    """``"2GB"`` -> 2_000_000_000, ``"2GiB"`` -> 2_147_483_648, ``"100K"`` -> 102_400, ``"4096"`` -> 4096."""
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise ConfigError(f"{what}={text!r} is not a size; write a number of bytes with an optional unit: "
                          f"KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB or K/M/G/T (powers of 1024), "
                          f"e.g. 500MB, 2GiB, 4096")
    return int(Fraction(m.group(1)) * _SIZE_UNITS[unit] + Fraction(1, 2))


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|sec|m|min|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {None: 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str, what: str = "duration", allow_inf: bool = False) -> float:
    """``"600"``, ``"10m"``, ``"1.5h"``, ``"250ms"`` -> seconds; ``"inf"`` where ``allow_inf``."""
    if allow_inf and str(text).strip().lower() in ("inf", "infinity"):
        return math.inf
    m = _DURATION_RE.match(str(text))
    if m is None:
        inf = ", or inf (wait for ever)" if allow_inf else ""
        raise ConfigError(f"{what}={text!r} is not a duration; write a number of seconds with an optional "
                          f"unit ms, s, m or h (e.g. 600, 10m, 1.5h){inf}")
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _DURATION_UNITS[unit]


# ---- the registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One ``JITKERN_*`` variable. ``parse(text, env_name)`` turns its text into the typed value."""

    name: str                      # Python name, used by get() and override()
    type: str                      # bool | size | duration | int | str | path | paths | flags | switches
    default: Any                   # typed default (None: "not set"); shown by `jitkern config`
    help: str
    parse: Callable[[str, str], Any]
    empty_is_error: bool = False
    secret: bool = False           # shown as "set"/"not set", never printed
    default_doc: str = ""          # how the default is shown where it is computed (e.g. platformdirs)

    @property
    def env(self) -> str:
        return PREFIX + self.name.upper()


_REGISTRY: dict[str, Setting] = {}


def declare(name: str, type: str, default: Any, help: str, parse: Callable[[str, str], Any], **kw) -> Setting:
    """Add a setting to the registry (jitkern's own are declared below; one name, one declaration)."""
    if name in _REGISTRY:
        raise ValueError(f"setting {name!r} is declared twice")
    s = Setting(name, type, default, help, parse, **kw)
    _REGISTRY[name] = s
    return s


def _bool(text, what):
    return parse_bool(text, what)


def _positive_seconds(text, what):
    v = parse_duration(text, what)
    if not v > 0:
        raise ConfigError(f"{what}={text!r} must be a positive number of seconds")
    return v


def _seconds_or_inf(text, what):
    return parse_duration(text, what, allow_inf=True)


def _positive_size(text, what):
    v = parse_size(text, what)
    if v <= 0:
        raise ConfigError(f"{what}={text!r} must be a positive size")
    return v


def _text(text, what):
    return text.strip()


def _paths(text, what):
    if "\0" in text:
        raise ConfigError(f"{what}={text!r} contains a NUL character; set it to one or more directories "
                          f"separated by {os.pathsep!r}")
    return tuple(p.strip() for p in text.split(os.pathsep) if p.strip())


def _flags(text, what):
    try:
        return tuple(shlex.split(text))
    except ValueError as e:
        raise ConfigError(f"{what}={text!r} cannot be split into flags like a shell would: {e}") from None


def _switches(allowed: tuple[str, ...]):
    def parse(text, what):
        items = tuple(s.strip().lower() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad:
            raise ConfigError(f"{what}={text!r}: unknown switch {bad[0]!r}; allowed: {', '.join(allowed)} "
                              f"(comma-separated)")
        return frozenset(items)
    return parse


declare("cache_dir", "paths", None,
        "Cache layers, separated by the OS path separator (':'): earlier layers are searched first and "
        "the first writable one receives new entries; a read-only layer can be baked into an image.",
        _paths, empty_is_error=True, default_doc="platformdirs user cache dir, e.g. ~/.cache/jitkern")
declare("arch", "str", None,
        "Compile for this arch instead of the GPU found (gfx942, gfx950, sm_90, sm_80, ...); also the arch "
        "whose configs CPU tensors use under TRITON_INTERPRET=1.", _text)
declare("debug", "switches", frozenset(),
        "Comma-separated debug switches: redzone (guard bands around every buffer, checked after each "
        "launch), checks (host-side checks of index-table contents before every launch: block tables, "
        "cu_seq_lens, sorted ids; a bad table raises TableError; implied by redzone). Read when a call signature "
        "is decided.",
        _switches(("redzone", "checks")))
def _strict(text, what):
    low = text.strip().lower()
    if low in _FALSE:
        return None
    if low in _TRUE or low == "error":
        return "error"
    if low == "warn":
        return "warn"
    raise ConfigError(f"{what}={text!r} is not a strict mode; use 1 (a run-time compile raises CacheMissError), "
                      f"warn (log each miss once and compile) or 0 (off)")


declare("strict", "choice", None,
        "Strict mode: 1 (or error) makes any compile at run time a CacheMissError that names the key parts "
        "in which the nearest cached entry differs; warn logs each miss once and compiles; 0: off. "
        "Prebuild and tune are never strict.", _strict)
declare("record", "path", None,
        "Append each distinct call signature an op sees to this manifest file (JSON lines, once per signature "
        "and process; several processes may share the file): what 'jitkern prebuild --manifest' builds.",
        _text)
declare("cache_max_size", "size", None,
        "Size cap of the writable cache layer, e.g. 20GB (20 * 10**9 bytes) or 20GiB (20 * 2**30): after a "
        "publish that passes it, least recently used entries no process holds are evicted down to 90 % of "
        "it (jitkern.evict); unset: no cap.", _positive_size)
declare("cache_sign_key", "path", None,
        "Ed25519 private key (from 'jitkern cache keygen PATH'): entries this process publishes, to the "
        "local cache and to the remote cache, are signed with it.", _text)
declare("cache_verify_key", "paths", (),
        "Ed25519 public key(s) (PATH.pub; ':'-separated while rotating keys): read-only cache layers "
        "(baked, installed wheels) load only entries signed by one of them, remote entries must carry "
        "such a signature, and 'cache import' checks bundles against them.", _paths)
declare("redzone_bytes", "size", 1024,
        "Guard band size for JITKERN_DEBUG=redzone (rounded up to 256 bytes).", _positive_size)
declare("direct_launch", "bool", True,
        "Launch GPU kernels through Triton's C launcher directly with integer addresses; 0: through "
        "Triton's CompiledKernel.", _bool)
declare("fast_call", "bool", True,
        "Run a decided call signature's launches of directly launched GPU kernels (signature, lookup, "
        "addresses, checks, Triton's C launch) in jitkern's C hot path (jitkern.fastcall, built once with "
        "the C compiler Triton uses for its launchers); 0: in Python.", _bool)
declare("background_build", "bool", False,
        "Serve while compiling: a call whose preferred candidate is not cached runs on a cached later one "
        "(next variant, smaller tile, PyTorch path) while a worker process builds the preferred one; later "
        "calls switch to it (never during CUDA-graph capture or a torch.compile trace). See jitkern.background.",
        _bool)
declare("autotune", "bool", False,
        "Time every candidate tile of a bucket on first use and record the winner (default: recorded and "
        "shipped winners only).", _bool)
declare("lock_timeout", "duration", 1800.0,
        "Longest wait for another process's build of the same key; inf waits for ever, 0 never waits "
        "(past it the build goes on privately).", _seconds_or_inf)
declare("build_timeout", "duration", 600.0,
        "Time limit of one C++/CUDA/HIP compiler run (at least 1 s).", _positive_seconds)
declare("nvcc", "path", None, "The nvcc to use (else CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda); a path that is not an "
        "executable makes CUDA variants unavailable (never another nvcc).", _text)
declare("hipcc", "path", None, "hipcc to use for HIP variants (else JITKERN_HIP_CLANG, a ROCm install's hipcc, "
        "clang++-22..20 on PATH; see docs/amd.md).", _text)
declare("hip_clang", "path", None, "clang++ (LLVM 20 or later) to drive directly for HIP variants.", _text)
declare("hip_include", "path", None,
        "Directory holding hip/hip_runtime.h for direct clang builds (else ROCM_PATH/include, /usr/include).",
        _text)
declare("hip_device_libs", "path", None,
        "Directory holding the AMD device libraries ocml.bc and ockl.bc (else a ROCm install's, Triton's wheel's).",
        _text)
declare("ck_dir", "path", None,
        "Composable Kernel root (has include/ck/ck.hpp) for HIP variants that need CK (else CK_DIR, an installed "
        "amd-aiter wheel, ROCM_PATH); 'none' switches CK off.", _text)
declare("cxx_include", "paths", (), "Extra include directories for C++ variants (':'-separated).", _paths)
declare("nvcc_flags", "flags", (), "Extra nvcc flags (shell-quoted).", _flags)
declare("hipcc_flags", "flags", (), "Extra HIP compiler flags, clang or hipcc (shell-quoted).", _flags)
declare("cxxflags", "flags", (), "Extra host C++ compiler flags (shell-quoted).", _flags)
declare("remote_cache", "str", None,
        "Remote shared cache, redis://[user:password@]host:port/db (rediss:// for TLS); needs jitkern[redis].",
        _text)
declare("remote_cache_key", "str", None,
        "Shared secret for the remote cache: entries are published with an HMAC-SHA256 and unsigned or "
        "badly signed entries are refused.", lambda t, w: t, empty_is_error=True, secret=True)
declare("remote_timeout", "duration", 2.0,
        "Seconds to connect to the remote cache and to wait for each reply.", _positive_seconds)
declare("remote_deadline", "duration", 10.0,
        "Longest time one remote-cache command may take in all, from sending it to the last byte of its "
        "reply (JITKERN_REMOTE_TIMEOUT bounds each read; a server trickling its reply is cut off here).",
        _positive_seconds)
declare("remote_max_value", "size", 64 * 1024 * 1024,
        "Largest remote-cache entry fetched or published; a larger one is skipped (sized first with "
        "STRLEN, never downloaded) and the kernel built here.", _positive_size)
declare("remote_lease_ttl", "duration", 30.0,
        "Seconds a remote build lease lives unless renewed.", _positive_seconds)
declare("remote_lease_wait", "duration", 900.0,
        "Longest this process waits, in all, for other nodes' builds (leases); once spent, every further "
        "build is local.", _positive_seconds)

#: ``JITKERN_<OP>_<PARAM>``: per-op tile overrides; validated against the op's tunables and arch rules
#: by ``jitkern.constraints`` (the registry only knows the family).
TILE_FAMILY_DOC = ("JITKERN_<OP>_<PARAM>", "Tile override of a registered op, e.g. JITKERN_GEMM_BLOCK_M=64: "
                   "the value must be one of the op's tunable values and allowed by the arch's rules.")


def registry() -> Mapping[str, Setting]:
    return dict(_REGISTRY)


def setting(name: str) -> Setting:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"no setting named {name!r}; settings: {', '.join(sorted(_REGISTRY))}") from None


# ---- reading -------------------------------------------------------------------------------------
_UNSET = object()
_overrides: dict[str, Any] = {}          # name -> typed value, or None for "as if unset"
_tile_overrides: dict[str, str] = {}     # "JITKERN_GEMM_BLOCK_M" -> "64"
_override_lock = threading.RLock()
_parsed: dict[tuple[str, str], Any] = {}  # (name, raw text) -> parsed value (parsing is pure)


# get() runs on hot paths (every op call asks for "debug"): look the variable up in os.environ's own
# encoded dict, which os.environ keeps in step with every change made through it (~0.1 us instead of
# ~1 us for os.environ.get). Decoded texts are memoised with the parse results.
_ENV_DATA = getattr(os.environ, "_data", None)
_encoded: dict[str, Any] = {}


def _environ_raw(env: str) -> str | bytes | None:
    if _ENV_DATA is None:
        return os.environ.get(env)
    key = _encoded.get(env)
    if key is None:
        key = _encoded[env] = os.environ.encodekey(env)
    return _ENV_DATA.get(key)


def environ_prefixed(prefixes: str | tuple[str, ...]) -> dict[str, str]:
    """The environment's variables whose names start with one of ``prefixes``, as ``{name: value}``
    (read now, so a change applies to the next call). Scans os.environ's encoded dict and decodes only
    the matches: iterating ``os.environ`` itself decodes every name and value (~100x slower, and this
    runs once per planned kernel, for its codegen environment, and once per decided signature)."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    env = os.environ
    data = _ENV_DATA
    if data is None:
        return {k: v for k, v in env.items() if k.startswith(prefixes)}
    enc = _encoded_prefixes.get(prefixes)
    if enc is None:
        enc = _encoded_prefixes[prefixes] = tuple(env.encodekey(p) for p in prefixes)
    return {env.decodekey(k): env.decodevalue(v) for k, v in data.items() if k.startswith(enc)}


_encoded_prefixes: dict = {}  # prefixes -> as os.environ's encoded keys (pure)


def _environ_get(env: str) -> str | None:
    raw = _environ_raw(env)
    return os.environ.decodevalue(raw) if isinstance(raw, bytes) else raw


def _from_text(s: Setting, raw: str | bytes) -> Any:
    ck = (s.name, raw)
    try:
        return _parsed[ck]
    except KeyError:
        pass
    if isinstance(raw, bytes):
        raw = os.environ.decodevalue(raw)
    if not raw.strip():
        if s.empty_is_error:
            raise ConfigError(f"{s.env} is set but empty (an unset shell variable?); unset it to use the default "
                              f"({s.default_doc or 'not set'}) or give it a value")
        value = s.default
    else:
        value = s.parse(raw, s.env)
    if len(_parsed) < 4096:
        _parsed[ck] = value
    return value


def get(name: str) -> Any:
    """The effective typed value of setting ``name``: override, else environment, else default."""
    s = _REGISTRY.get(name) or setting(name)
    if _overrides:
        v = _overrides.get(name, _UNSET)
        if v is not _UNSET:
            return s.default if v is None else v
    raw = _environ_raw(s.env)
    if raw is None:
        return s.default
    return _from_text(s, raw)


def source(name: str) -> str:
    """Where ``get(name)`` comes from: ``override``, ``env`` or ``default``."""
    s = setting(name)
    if name in _overrides:
        return "override" if _overrides[name] is not None else "default (override: unset)"
    raw = _environ_get(s.env)
    if raw is None or (not raw.strip() and not s.empty_is_error):
        return "default"
    return "env"


def tile_overrides(op: str) -> dict[str, str]:
    """Raw ``JITKERN_<OP>_<PARAM>`` texts for ``op`` (environment, then overrides), by variable name;
    empty values count as unset. ``jitkern.constraints`` validates them."""
    prefix = f"{PREFIX}{op.upper()}_"
    out = {k: v for k, v in environ_prefixed(prefix).items() if v.strip()}
    for k, v in _tile_overrides.items():
        if k.startswith(prefix):
            if v is None:
                out.pop(k, None)
            else:
                out[k] = v
    return out


def _coerce(s: Setting, value: Any) -> Any:
    """A Python override value: text goes through the setting's parser; typed values are checked."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return _from_text(s, value)
    if s.type == "bool":
        if isinstance(value, bool):
            return value
    elif s.type in ("size",):
        if isinstance(value, int) and not isinstance(value, bool):
            return s.parse(str(value), s.env)
    elif s.type == "duration":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return s.parse("inf" if value == math.inf else repr(float(value)), s.env)
    elif s.type in ("paths", "flags"):
        if isinstance(value, (list, tuple)):
            items = tuple(os.fspath(v) for v in value)
            return _from_text(s, (os.pathsep if s.type == "paths" else " ").join(
                items if s.type == "paths" else map(shlex.quote, items)))
    elif s.type == "switches":
        if isinstance(value, (set, frozenset, list, tuple)):
            return _from_text(s, ",".join(value))
    raise ConfigError(f"override {s.name}={value!r}: expected a {s.type} (or its text form, as in {s.env})")


@contextlib.contextmanager
def override(tiles: Mapping[str, Mapping[str, Any]] | None = None, **values: Any) -> Iterator[None]:
    """Set settings for the duration of the ``with`` block (process-wide; nests; restores on exit).

    ``override(cache_dir="/tmp/jk", autotune=True)``; ``override(arch=None)`` = as if unset;
    ``override(tiles={"gemm": {"block_m": 64}})`` = ``JITKERN_GEMM_BLOCK_M=64``. Values are checked
    now: a bad one raises ``ConfigError`` before the block runs.
    """
    parsed = {name: _coerce(setting(name), v) for name, v in values.items()}
    tiles_raw = {}
    for op, params in (tiles or {}).items():
        for param, v in params.items():
            tiles_raw[f"{PREFIX}{op.upper()}_{param.upper()}"] = None if v is None else str(v)
    with _override_lock:
        saved = (dict(_overrides), dict(_tile_overrides))
        _overrides.update(parsed)
        _tile_overrides.update(tiles_raw)
    try:
        yield
    finally:
        with _override_lock:
            _overrides.clear()
            _overrides.update(saved[0])
            _tile_overrides.clear()
            _tile_overrides.update(saved[1])


def _to_text(s: Setting, value: Any) -> str:
    if s.type == "bool":
        return "1" if value else "0"
    if s.type == "paths":
        return os.pathsep.join(value)
    if s.type == "flags":
        return " ".join(shlex.quote(v) for v in value)
    if s.type == "switches":
        return ",".join(sorted(value))
    if s.type == "duration" and value == math.inf:
        return "inf"
    return "" if value is None else str(value)


def child_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a subprocess: ``base`` (default ``os.environ``) with the active overrides."""
    env = dict(os.environ if base is None else base)
    for name, value in _overrides.items():
        s = _REGISTRY[name]
        if value is None:
            env.pop(s.env, None)
        else:
            env[s.env] = _to_text(s, value)
    for k, v in _tile_overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


# ---- reporting -----------------------------------------------------------------------------------
def _show(s: Setting, value: Any) -> Any:
    """A JSON-able form of a value (secrets hidden)."""
    if s.secret:
        return None if value is None else "(set)"
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def describe() -> list[dict[str, Any]]:
    """Every setting: ``name, env, type, value, source, default, help`` (``value`` may be an
    ``{"error": message}`` when the environment holds a bad value)."""
    rows = []
    for s in _REGISTRY.values():
        try:
            value: Any = _show(s, get(s.name))
        except ConfigError as e:
            value = {"error": str(e)}
        rows.append({"name": s.name, "env": s.env, "type": s.type, "value": value, "source": source(s.name),
                     "default": s.default_doc or _show(s, s.default), "help": s.help})
    return rows


def markdown() -> str:
    """docs/settings.md (tests check the file matches)."""
    lines = ["# Settings", "",
             "<!-- generated by `python -m jitkern.settings --markdown > docs/settings.md`; "
             "tests/test_settings.py checks it -->", "",
             "Every setting is an environment variable, read when it is used (not at import). From Python, "
             "`jitkern.settings.override(name=value, ...)` sets them for a `with` block; "
             "`jitkern config` prints each one's effective value and where it came from.", "",
             "Parsing rules: booleans are `1, true, on, yes` / `0, false, off, no`; sizes take `KB/MB/GB/TB` "
             "(powers of 1000) or `KiB/MiB/GiB/TiB` and bare `K/M/G/T` (powers of 1024); durations are seconds "
             "with an optional unit `ms, s, m, h`. An empty value counts as unset, except where the table says "
             "*empty is an error*. A bad value is a `ConfigError` naming the variable, the value and what is "
             "allowed.", "",
             "| variable | Python name | type | default | meaning |", "|---|---|---|---|---|"]
    for s in _REGISTRY.values():
        d = s.default_doc or _to_text(s, s.default) or "(not set)"
        extra = " *Empty is an error.*" if s.empty_is_error else ""
        lines.append(f"| `{s.env}` | `{s.name}` | {s.type} | {d} | {s.help}{extra} |")
    fam, doc = TILE_FAMILY_DOC
    lines.append(f"| `{fam}` | `override(tiles={{op: {{param: value}}}})` | per op | (op's own) | {doc} |")
    return "\n".join(lines) + "\n"


__all__ = ["Setting", "declare", "registry", "setting", "get", "source", "override", "tile_overrides",
           "environ_prefixed", "child_environ", "describe", "markdown", "parse_bool", "parse_size", "parse_duration"]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown())
    else:
        sys.exit("usage: python -m jitkern.settings --markdown")
