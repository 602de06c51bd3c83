"""The ``jitkern`` command line (also ``python -m jitkern``).

Subcommands::

    jitkern prebuild --arch gfx942,gfx950,sm_90 [--op NAME ...] [--jobs N] [--cache-dir DIR]
                     [--report FILE.json] [--keep-going]
    jitkern list [--json]
    jitkern doctor [--json]
    jitkern cache stats|verify|prune --max-size SIZE|clear [--failures]|export FILE|import FILE
    jitkern tune --op NAME --shapes MxNxK,... [--dtype bf16|fp16] [--b-trans] [--force] [--json]
    jitkern cache push|pull [--remote redis://host:port/db]
    jitkern record -o FILE -- CMD ...
    jitkern prebuild --manifest FILE --arch LIST
    jitkern cache check|explain --manifest FILE --arch LIST [--json]

Exit status: 0 success; 1 something failed (a build, a damaged cache entry); 2 bad arguments
(argparse errors, unknown arch or op, bad values); 130 interrupted.

Adding a subcommand: write ``_add_<name>(sub)`` that calls ``sub.add_parser(...)`` and
``set_defaults(func=<handler>)`` (handler: ``args -> int``), and append it to ``SUBCOMMANDS``.
Import heavy modules inside the handler, not at module level, so ``jitkern --help`` stays fast.
Sections of ``jitkern doctor`` are functions in ``DOCTOR_SECTIONS`` returning
``(title, [(label, value), ...])``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from . import settings
from .errors import ConfigError, JitkernError, SpecError, UnknownArchError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---- argument types ----------------------------------------------------------------------------
def arch_list(text: str):
    """argparse type for ``--arch gfx942,gfx950,sm_90``: a list of ``jitkern.arch.Arch``."""
    from . import arch

    try:
        return arch.parse_list(text)
    except UnknownArchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_size(text: str) -> int:
    """``"20GB"`` = 20 * 10**9, ``"20GiB"`` = 20 * 2**30, ``"500M"`` = 500 * 2**20, ``"4096"`` -> bytes."""
    return settings.parse_size(text, "size")


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return n


def report_file(text: str) -> str:
    """argparse type for a file jitkern writes (``--report``): checked before any work is done."""
    from .cachectl import check_output_file

    try:
        return check_output_file(text, "report file", make_parents=True)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def archive_file(text: str) -> str:
    """argparse type for ``cache export FILE``."""
    from .cachectl import check_output_file

    try:
        return check_output_file(text, "export archive")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_table(rows: list[list], header: list[str], file=None) -> None:
    """A plain, aligned text table."""
    file = file or sys.stdout
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip(),
              file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def _cache_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR",
                   help="cache directory (layers separated by %r); default: JITKERN_CACHE_DIR, else the "
                        "user cache dir" % os.pathsep)


# ---- prebuild ----------------------------------------------------------------------------------
def _add_prebuild(sub) -> None:
    p = sub.add_parser("prebuild", help="compile every configuration the runtime can select, for named arches",
                       description="Compile every op x variant x configuration that the runtime can select for "
                                   "each arch into the cache (no GPU needed). A second run builds nothing.")
    p.add_argument("--arch", type=arch_list, metavar="LIST",
                   help="comma-separated arches, e.g. gfx942,gfx950,sm_90 ('cpu' = Triton interpreter); "
                        "default: the detected GPU")
    p.add_argument("--op", action="append", metavar="NAME", help="only this op (repeatable); default: all ops")
    p.add_argument("--jobs", "-j", type=positive_int, metavar="N", help="worker processes (default: one per core)")
    _cache_dir_option(p)
    p.add_argument("--report", metavar="FILE", type=report_file,
                   help="write a JSON report, one record per artifact (checked before building)")
    p.add_argument("--keep-going", action="store_true", help="exit 0 even if some artifacts failed to build")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="only the first N configurations of each op and arch (smoke tests, benchmarks)")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="progress display: a bar on a terminal, one line per artifact otherwise (default: auto)")
    p.add_argument("--manifest", metavar="FILE",
                   help="build only what the signatures recorded in FILE run on each arch (JITKERN_RECORD / "
                        "'jitkern record'), and report per signature which config covers it")
    p.add_argument("--json", action="store_true", help="with --manifest: print the report as JSON")
    p.set_defaults(func=_run_prebuild)


def _run_prebuild(args) -> int:
    if args.manifest:
        if args.limit:
            raise ConfigError("--limit does not apply to --manifest (a manifest names exactly what to build)")
        from . import coverage

        return coverage.prebuild_main(args)
    from . import prebuild

    return prebuild.main(args)


# ---- record ------------------------------------------------------------------------------------
def _add_record(sub) -> None:
    p = sub.add_parser("record", help="run a command and record every call signature its ops see into a manifest",
                       description="Run CMD with JITKERN_RECORD=FILE: each process appends every distinct call "
                                   "signature (op, dtypes, shapes, strides, flags) once, as JSON lines. "
                                   "'jitkern prebuild --manifest FILE --arch ...' then builds exactly those.")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="manifest to append to (created if missing)")
    p.add_argument("--fresh", action="store_true", help="empty FILE first instead of appending to it")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command to run")
    p.set_defaults(func=_run_record)


def _run_record(args) -> int:
    import subprocess

    from . import manifest

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ConfigError("no command to record; write: jitkern record -o FILE -- CMD [ARGS ...]")
    path = os.path.abspath(args.output)
    if args.fresh:
        open(path, "w").close()
    before = len(manifest.read(path)) if os.path.exists(path) else 0
    env = settings.child_environ()
    env[manifest.ENV] = path
    try:
        rc = subprocess.run(cmd, env=env).returncode
    except OSError as e:
        raise ConfigError(f"cannot run {cmd[0]!r}: {e.strerror or e}") from None
    after = len(manifest.read(path)) if os.path.exists(path) else 0
    if args.json:
        print(json.dumps({"manifest": path, "signatures": after, "new": after - before, "returncode": rc}))
    else:
        print(f"jitkern record: {path}: {after} signatures ({after - before} new); {cmd[0]} exited {rc}",
              file=sys.stderr)
    return rc if rc >= 0 else 128 - rc


# ---- list --------------------------------------------------------------------------------------
def _add_list(sub) -> None:
    p = sub.add_parser("list", help="ops, their variants, parameters and supported arches")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_list)


def describe_ops() -> list[dict]:
    """Ops, variants, parameter values and configuration counts per arch (used by ``jitkern list``)."""
    from . import arch, registry

    out = []
    for name in registry.names():
        try:
            spec = registry.get(name)
        except JitkernError as e:
            out.append({"op": name, "error": str(e)})
            continue
        per_arch: dict[str, int] = {}
        params: dict[str, dict[str, set]] = {}
        for a in arch.ARCHES.values():
            try:
                cfgs = list(spec.configs(a))
            except JitkernError:
                cfgs = []
            if cfgs:
                per_arch[a.name] = len(cfgs)
            for c in cfgs:
                vp = params.setdefault(c.variant, {})
                for k, v in c.params:
                    vp.setdefault(k, set()).add(v)
        doc = (spec.doc or "").strip().splitlines()
        if doc and doc[0].startswith(f"{name}:"):
            doc[0] = doc[0][len(name) + 1:].strip()
        out.append({
            "op": name,
            "summary": doc[0] if doc else "",
            "variants": [{"name": v.name, "kind": v.kind, "kernel": v.kernel,
                          "params": {k: sorted(vals, key=repr) for k, vals in params.get(v.name, {}).items()}}
                         for v in spec.variants],
            "configs_per_arch": per_arch,
        })
    return out


def _run_list(args) -> int:
    ops = describe_ops()
    if args.json:
        print(json.dumps(ops, indent=1, default=str))
        return EXIT_OK
    for op in ops:
        if "error" in op:
            print(f"{op['op']}: cannot be loaded: {op['error']}")
            continue
        print(f"{op['op']}: {op['summary']}")
        archs = ", ".join(f"{a} ({n} configs)" for a, n in op["configs_per_arch"].items())
        print(f"  arches: {archs or '(none)'}")
        for v in op["variants"]:
            print(f"  variant {v['name']} [{v['kind']}] kernel {v['kernel']}")
            for k, vals in v["params"].items():
                print(f"    {k}: {', '.join(map(str, vals))}")
    return EXIT_OK


# ---- doctor ------------------------------------------------------------------------------------
def _doctor_arch() -> tuple[str, list[tuple[str, str]]]:
    from . import arch

    rows = [("JITKERN_ARCH", settings.get("arch") or "(not set)")]
    try:
        a = arch.current()
        rows.append(("arch", f"{a.name} ({a.product}); LDS/shared per block {a.shared_mem_per_block // 1024} KiB"))
    except JitkernError as e:
        rows.append(("arch", f"none: {e}"))
    return "GPU", rows


def _doctor_toolchains() -> tuple[str, list[tuple[str, str]]]:
    import shutil
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    rows = []
    for pkg in ("jitkern", "triton", "torch", "numpy"):
        try:
            rows.append((pkg, version(pkg)))
        except PackageNotFoundError:
            rows.append((pkg, "not installed"))
    for tool, flag in (("nvcc", "--version"), ("ninja", "--version"), ("c++", "--version")):  # HIP: its own section
        path = shutil.which(tool)
        if not path:
            rows.append((tool, "not found"))
            continue
        try:
            r = subprocess.run([path, flag], capture_output=True, text=True, timeout=20)
            lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
            ver = next((ln for ln in lines if "release" in ln.lower()), lines[0] if lines else "?")
        except (OSError, subprocess.SubprocessError) as e:
            ver = f"fails to run: {e}"
        rows.append((tool, f"{ver.strip()} ({path})"))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "") or "(not set)"))
    return "Toolchains", rows


def _doctor_cache() -> tuple[str, list[tuple[str, str]]]:
    from . import cachectl

    rows, first = [], True
    for info in cachectl.layer_info():
        role = "read-only"
        if info.get("installed_from"):
            role = f"installed by {info['installed_from']} (entry point jitkern.cache_layers), read-only"
        elif info["writable"]:
            role, first = ("writable (new entries go here)" if first else "writable, but only read (new entries go to an earlier layer)"), False
        rows.append((info["path"], f"{role}, {info['entries']} entries, {human_size(info['bytes'])}"))
        if info.get("prebuild"):
            rows.append(("  last prebuild", cachectl.describe_prebuild(info["prebuild"])))
    return "Cache layers (JITKERN_CACHE_DIR, then installed cache wheels; first writable one receives new entries)", rows


def _doctor_ops() -> tuple[str, list[tuple[str, str]]]:
    from . import doctor

    return doctor.section()


#: ``jitkern doctor`` prints each of these sections; append yours.
def _doctor_remote() -> tuple[str, list[tuple[str, str]]]:
    from . import remote

    return remote.doctor()


def _doctor_tuning() -> tuple[str, list[tuple[str, str]]]:
    from . import tuning

    return tuning.doctor()


def _doctor_amd() -> tuple[str, list[tuple[str, str]]]:
    from .builders import hip

    return "AMD toolchain (HIP variants, offline builds for gfx942/gfx950; docs/amd.md)", hip.describe()


DOCTOR_SECTIONS: list[Callable[[], tuple[str, list[tuple[str, str]]]]] = [
    _doctor_arch, _doctor_toolchains, _doctor_amd, _doctor_cache, _doctor_ops, _doctor_remote, _doctor_tuning,
]


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="detected arch, toolchains and versions, cache layers")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_doctor)


def _run_doctor(args) -> int:
    report = {}
    for section in DOCTOR_SECTIONS:
        try:
            title, rows = section()
        except Exception as e:  # a broken section must not hide the others
            title, rows = getattr(section, "__name__", "section"), [("error", f"{type(e).__name__}: {e}")]
        report[title] = dict(rows)
        if not args.json:
            print(title)
            width = max((len(k) for k, _ in rows), default=0)
            for k, v in rows:
                print(f"  {k.ljust(width)}  {v}")
    if args.json:
        print(json.dumps(report, indent=1))
    return EXIT_OK


# ---- cache -------------------------------------------------------------------------------------
def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="inspect and manage the on-disk cache")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    s = csub.add_parser("stats", help="entries and bytes per layer, arch and op; recorded build failures")
    s.add_argument("--json", action="store_true")
    v = csub.add_parser("verify", help="check every entry's checksums (exit 1 on damage)")
    v.add_argument("--discard", action="store_true", help="also remove damaged entries from writable layers")
    pr = csub.add_parser("prune", help="remove least recently used entries until the cache fits a size")
    pr.add_argument("--max-size", type=size_arg, metavar="SIZE",
                    help="e.g. 20GB (10**9 bytes) or 20GiB (2**30); default: JITKERN_CACHE_MAX_SIZE")
    pr.add_argument("--json", action="store_true")
    c = csub.add_parser("clear", help="remove every entry of the writable layer")
    c.add_argument("--failures", action="store_true", help="only recorded build failures")
    e = csub.add_parser("export", help="write every entry of every layer into one archive, or into a wheel")
    e.add_argument("file", metavar="FILE", help="archive to write (.tar, .tar.gz); with --wheel: a directory "
                                                "or a .whl path")
    e.add_argument("--sign-key", metavar="PATH", help="Ed25519 private key (jitkern cache keygen): sign the bundle "
                                                      "and every entry in it; default: JITKERN_CACHE_SIGN_KEY")
    e.add_argument("--wheel", metavar="DIST_NAME", help="build a wheel that installs a read-only cache layer "
                                                        "(entry point jitkern.cache_layers); needs jitkern[wheel]")
    e.add_argument("--version", dest="wheel_version", metavar="V", help="the wheel's version (with --wheel)")
    e.add_argument("--json", action="store_true")
    i = csub.add_parser("import", help="add the entries of an archive to the writable layer (verified, atomic)")
    i.add_argument("file", metavar="FILE", help="archive made by 'jitkern cache export'")
    i.add_argument("--verify-key", metavar="PATH.pub", help="refuse the bundle unless it is signed by this Ed25519 "
                                                            "public key, unchanged; default: JITKERN_CACHE_VERIFY_KEY")
    i.add_argument("--json", action="store_true")
    kg = csub.add_parser("keygen", help="write a new Ed25519 signing key: PATH (private, 0600) and PATH.pub")
    kg.add_argument("path", metavar="PATH")
    kg.add_argument("--json", action="store_true")
    pu = csub.add_parser("push", help="upload every local entry the remote cache lacks (JITKERN_REMOTE_CACHE)")
    pu.add_argument("--overwrite", action="store_true", help="replace entries the remote already has")
    pl = csub.add_parser("pull", help="download every remote entry missing locally (checked before it is stored)")
    for q in (pu, pl):
        q.add_argument("--remote", metavar="URL", help="redis://host:port/db; default: JITKERN_REMOTE_CACHE "
                                                       "(signing: JITKERN_REMOTE_CACHE_KEY)")
    ck = csub.add_parser("check", help="exit 1 listing every manifest signature the cache cannot serve "
                                       "without compiling")
    ex = csub.add_parser("explain", help="for every manifest signature the cache cannot serve: the nearest "
                                         "entry and the key parts in which it differs")
    for q in (ck, ex):
        q.add_argument("--manifest", required=True, metavar="FILE", help="signatures recorded by JITKERN_RECORD")
        q.add_argument("--arch", type=arch_list, metavar="LIST", help="comma-separated arches; default: the detected GPU")
        q.add_argument("--json", action="store_true", help="machine-readable output")
    for q in (s, v, pr, c, e, i, pu, pl, ck, ex):
        _cache_dir_option(q)
    p.set_defaults(func=_run_cache)


def _run_cache(args) -> int:
    if args.cache_command in ("push", "pull"):
        from . import remote

        return remote.main(args)
    if args.cache_command in ("check", "explain"):
        from . import coverage

        return coverage.check_main(args) if args.cache_command == "check" else coverage.explain_main(args)
    from . import cachectl

    return cachectl.main(args)


# ---- tune --------------------------------------------------------------------------------------
def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="benchmark an op's tile candidates on this GPU and keep the winners",
                       description="Time every candidate that passes the arch rules and budget for each shape "
                                   "bucket, and persist the winner per (arch, op, dtype, bucket, compiler "
                                   "fingerprint) in the cache; later processes use it without retuning.")
    p.add_argument("--op", required=True, metavar="NAME", help="op to tune, e.g. gemm")
    p.add_argument("--shapes", required=True, metavar="LIST",
                   help="comma-separated shapes, sizes joined by 'x' (gemm: MxNxK), e.g. 4096x4096x4096,16x4096x4096")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="input dtype (default: bf16)")
    p.add_argument("--b-trans", action="store_true", help="gemm: B is a transposed row-major [N, K] weight")
    p.add_argument("--force", action="store_true", help="retune buckets that already have a record")
    _cache_dir_option(p)
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.set_defaults(func=_run_tune)


def _run_tune(args) -> int:
    from . import tuning

    return tuning.main(args)


#: Subcommand registrars, in the order ``jitkern --help`` lists them.
SUBCOMMANDS: list[Callable] = [_add_prebuild, _add_record, _add_list, _add_doctor, _add_cache, _add_tune]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="jitkern", description="JIT kernel compilation with an on-disk cache.")
    parser.add_argument("--version", action="version", version=f"jitkern {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _setup_logging(verbosity: int) -> None:
    import logging

    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("jitkern")
    logger.setLevel(level)
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(h)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version: 0; bad arguments: 2 (argparse printed why)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("jitkern: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UnknownArchError, SpecError, ConfigError) as e:  # what the user asked for is not valid
        print(f"jitkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JitkernError as e:
        print(f"jitkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # a file or directory the command needed (named in the message); never a traceback
        print(f"jitkern {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
