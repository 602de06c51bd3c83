"""The ``jitkern`` command line (also ``python -m jitkern``). Reference: docs/cli.md.

Subcommands::

    jitkern prebuild --arch gfx942,gfx950,sm_90 [--op NAME ...] [--jobs N] [--report FILE.json] [--keep-going]
    jitkern prebuild --manifest FILE --arch LIST
    jitkern record -o FILE -- CMD ...
    jitkern list
    jitkern doctor
    jitkern config
    jitkern cache stats|verify [--discard]|prune --max-size SIZE|clear [--failures] [--dry-run]
                  |export FILE|import FILE|push|pull [--remote redis://host:port/db]
                  |check|explain --manifest FILE --arch LIST
    jitkern tune --op NAME --shapes MxNxK,... [--dtype bf16|fp16] [--b-trans] [--force] [--exact]

Global options, accepted before or after the subcommand: ``-v/--verbose`` (repeat for debug),
``--cache-dir DIR`` (layers separated by ``os.pathsep``; default ``JITKERN_CACHE_DIR``, else the
user cache dir) and ``--json`` (one JSON document on stdout; keys documented in docs/cli.md).

Exit status: 0 success; 1 something failed (a build, a damaged cache entry, a full disk); 2 bad
arguments or settings (argparse errors, unknown arch or op, a bad value, a path that is not a
directory); 130 interrupted. Errors are one line on stderr, never a traceback.

Adding a subcommand: write ``_add_<name>(sub)`` that calls ``_parser(sub, ...)`` and
``set_defaults(func=<handler>)`` (handler: ``args -> int``), and append it to ``SUBCOMMANDS``.
Import heavy modules inside the handler, not at module level, so ``jitkern --help`` stays fast.
Sections of ``jitkern doctor`` are functions in ``DOCTOR_SECTIONS`` returning
``{"key", "title", "rows": [{"key", "label", "value", "text"}]}``: ``value`` is typed data for
``--json``, ``text`` what a person reads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import textwrap
from typing import Any, Callable

from . import (__version__, arch, cachectl, cachewheel, coverage, doctor, evict, manifest, prebuild, registry, remote,
               settings, signing, strict, tuning)
from .cache import Store, check_dirs, configured_layers
from .cachectl import check_output_file
from .errors import ConfigError, JitkernError, SpecError, UnknownArchError
from .logs import quiet_third_party_warnings
from .tables import human_size, print_table

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---- argument types ----------------------------------------------------------------------------
def arch_list(text: str):
    """argparse type for ``--arch gfx942,gfx950,sm_90``: a list of ``jitkern.arch.Arch``."""
    try:
        return arch.parse_list(text)
    except UnknownArchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_size(text: str) -> int:
    """Bytes from ``"500MB"`` (10**6), ``"2GiB"`` (2**30), ``"100K"`` (2**10), ``"4096"``: the
    settings registry's one size parser (``jitkern.settings.parse_size``)."""
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
    try:
        return check_output_file(text, "report file", make_parents=True)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, sort_keys=True, default=str))


def terminal_width() -> int:
    width = shutil.get_terminal_size((100, 24)).columns
    return width if width >= 40 else 100  # a width-0 pty reports nonsense


def plain(text: str) -> str:
    """Docstring text for a terminal: reStructuredText ``literals`` lose their backticks."""
    return re.sub(r"``([^`]+)``", r"\1", text or "").replace("`", "")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``jitkern cache prune: error: ... (see jitkern cache prune --help)``."""
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- global options ----------------------------------------------------------------------------
def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """-v, --cache-dir, --json: on the top parser (with defaults) and on every subcommand parser
    (``SUPPRESS``: absent there, the top parser's value stands), so they go before or after."""
    quiet = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="count", dest="verbose" if top else "verbose_after",
                   **({"default": 0} if top else quiet), help="more log output (-vv: debug)")
    p.add_argument("--cache-dir", metavar="DIR", **({"default": None} if top else quiet),
                   help=f"cache directory (layers separated by {os.pathsep!r}); default: JITKERN_CACHE_DIR, "
                        f"else the user cache dir")
    p.add_argument("--json", action="store_true", **({"default": False} if top else quiet),
                   help="machine-readable output: one JSON document on stdout (keys: docs/cli.md)")


def _parser(sub, name: str, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, **kw)
    _global_options(p, top=False)
    return p


def check_cache_dir(raw: str | None) -> None:
    """``--cache-dir``: not empty, no NUL, and each layer a directory where it exists."""
    if raw is None:
        return
    if not raw.strip():
        raise ConfigError(f"--cache-dir {raw!r} is empty (an unset shell variable?); name a directory, or leave "
                          f"the option out to use JITKERN_CACHE_DIR or the default")
    if "\0" in raw:
        raise ConfigError("--cache-dir contains a NUL character")
    for part in raw.split(os.pathsep):
        path = os.path.expanduser(part.strip())
        if path and os.path.lexists(path) and not os.path.isdir(path):
            raise ConfigError(f"--cache-dir {path} is not a directory; name a directory (it is created if missing)")


# ---- prebuild ----------------------------------------------------------------------------------
def _add_prebuild(sub) -> None:
    p = _parser(sub, "prebuild", help="compile every configuration the runtime can select, for named arches",
                description="Compile every op x variant x configuration that the runtime can select for "
                            "each arch into the cache (no GPU needed). A second run builds nothing.")
    p.add_argument("--arch", type=arch_list, metavar="LIST",
                   help="comma-separated arches, e.g. gfx942,gfx950,sm_90 ('cpu' = Triton interpreter); "
                        "default: the detected GPU")
    p.add_argument("--op", action="append", metavar="NAME", help="only this op (repeatable); default: all ops")
    p.add_argument("--jobs", "-j", type=positive_int, metavar="N", help="worker processes (default: one per core)")
    p.add_argument("--report", metavar="FILE", type=report_file,
                   help="write the JSON report (same as --json prints) to FILE (checked before building)")
    p.add_argument("--keep-going", action="store_true", help="exit 0 even if some artifacts failed to build")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="only the first N configurations of each op and arch (smoke tests, benchmarks)")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="progress display: a bar on a terminal, one line per artifact otherwise (default: auto)")
    p.add_argument("--manifest", metavar="FILE",
                   help="build only what the signatures recorded in FILE run on each arch (JITKERN_RECORD / "
                        "'jitkern record'), and report per signature which config covers it")
    p.set_defaults(func=_run_prebuild)


def _run_prebuild(args) -> int:
    if args.manifest:
        if args.limit:
            raise ConfigError("--limit does not apply to --manifest (a manifest names exactly what to build)")
        return _run_prebuild_manifest(args)
    return _run_prebuild_all(args)


class PrebuildDisplay(prebuild.Progress):
    """What ``jitkern prebuild`` prints while it runs: the planning lines, then a tqdm bar on a
    terminal, else one plain line per artifact (``mode``: auto, bar, lines, none)."""

    def __init__(self, mode: str, file=None, announce: bool = True):
        self.mode, self._file, self.announce = mode, file, announce
        self.total, self.done, self.bar = 0, 0, None

    @property
    def file(self):
        return self._file if self._file is not None else sys.stdout

    def planning(self, ops, arches) -> None:
        if self.announce:
            print(f"jitkern prebuild: planning {_ops_text(ops)} for {', '.join(a.name for a in arches)} "
                  f"(rendering and keying every configuration; nothing is compiled yet)", file=self.file, flush=True)

    def planned(self, tasks, ops, arches, where) -> None:
        if self.announce:
            print(f"jitkern prebuild: {len(tasks)} artifacts for {', '.join(a.name for a in arches)} "
                  f"({_ops_text(ops)}) into {where}", file=self.file, flush=True)

    def start(self, total: int) -> None:
        mode = self.mode
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.done, self.bar = mode, total, 0, None
        if mode == "bar" and total:
            from tqdm import tqdm

            # a pseudo-terminal of size 0x0 (some CI runners and containers) makes tqdm draw nothing (no
            # width, and a bar at row 0 of a 0-row screen is "hidden"): give it a size of its own
            try:
                cols, rows = os.get_terminal_size(sys.stderr.fileno())
            except (OSError, ValueError):
                cols, rows = 0, 0
            self.bar = tqdm(total=total, unit="artifact", desc="jitkern prebuild", file=sys.stderr,
                            ncols=None if cols >= 40 else 80, nrows=None if rows >= 1 else 24, mininterval=0.5)

    def update(self, rec: dict[str, Any]) -> None:
        self.done += 1
        line = prebuild_line(rec)
        if self.bar is not None:
            self.bar.update(1)
            if rec["status"] == "failed":
                self.bar.write(line, file=sys.stderr)
        elif self.mode == "lines":
            width = len(str(self.total))
            print(f"[{self.done:>{width}}/{self.total}] {line}", file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ops_text(ops) -> str:
    return ", ".join(ops) if ops else "all ops"


def prebuild_line(rec: dict[str, Any]) -> str:
    """One artifact's record as the line ``jitkern prebuild`` prints for it."""
    params = ",".join(f"{k}={v}" for k, v in rec["params"].items())
    s = f"{rec['status']:<8} {rec['arch']:<7} {rec['op']}/{rec['variant']}({params})"
    if rec.get("seconds") is not None:
        s += f" {rec['seconds']:.2f}s"
    if rec.get("shared_bytes") is not None:
        s += f" shared={rec['shared_bytes']}"
    if rec.get("error"):
        s += f"  error{' (transient: not recorded, run again)' if rec.get('transient') else ''}: " \
             f"{rec['error'].splitlines()[0]}"
        if rec.get("log_path"):
            s += f" (log: {rec['log_path']})"
    return s


def print_prebuild_summary(summary: dict[str, dict[str, Any]], file=None) -> None:
    """The per-arch table of statuses (``jitkern.prebuild.summarize``)."""
    rows = [[a, s["built"], s["cached"], s["rejected_over_budget"], s["unavailable"], s["failed"], s["total"],
             f"{s['seconds_per_built']:.2f}" if s["seconds_per_built"] is not None else "-"]
            for a, s in summary.items()]
    print_table(rows, ["arch", "built", "cached", "rejected", "unavailable", "failed", "total", "s/built"],
                file=file)


def _write_report(path, data) -> None:
    """``--report FILE``: the JSON report, replaced atomically (its directory was made by ``report_file``)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _run_prebuild_all(args) -> int:
    """``jitkern prebuild`` over every op's configurations (``jitkern.prebuild.prebuild``). With
    ``--json`` the report goes to stdout and everything a person reads to stderr."""
    as_json = bool(getattr(args, "json", False))
    out = sys.stderr if as_json else sys.stdout
    res = prebuild.prebuild(args.op, args.arch, args.cache_dir, args.jobs, getattr(args, "limit", None),
                            PrebuildDisplay(args.progress, out))
    seconds, summary, records = res.seconds, res.summary, res.records
    built, failed = res.built, res.failed
    if args.report or as_json:
        report = res.report()
        if args.report:
            _write_report(args.report, report)
        if as_json:
            print(json.dumps(report, indent=1, sort_keys=True, default=str))
    print_prebuild_summary(summary, file=out)
    if res.interrupted:
        print(f"jitkern prebuild: interrupted after {seconds:.1f} s; {built} built, "
              f"{res.not_built} not built (no partial entries were left; run again to finish)", file=sys.stderr)
        return EXIT_INTERRUPTED
    transient = res.transient
    if built == 0 and failed == 0:
        print(f"jitkern prebuild: nothing to build: all {len(records)} artifacts are already in the cache "
              f"({seconds:.1f} s)", file=out)
    else:
        print(f"jitkern prebuild: {built} built, {len(records) - built - failed} already cached or recorded, "
              f"{failed} failed" + (f" ({transient} transient: not recorded, run again)" if transient else "")
              + f" in {seconds:.1f} s", file=out)
    unavailable: dict[tuple, int] = {}
    for r in records:
        if r["status"] == "unavailable":
            why = (r["error"] or "").splitlines()[0] if r["error"] else ""
            k = (r["op"], r["variant"], r["arch"], why)
            unavailable[k] = unavailable.get(k, 0) + 1
    for (op, variant, a, why), n in sorted(unavailable.items()):
        print(f"jitkern prebuild: {n} {op}/{variant} artifacts for {a} are unavailable on this machine (the runtime "
              f"falls back to the next variant): {why}", file=sys.stderr)
    if failed:
        first = next(r for r in records if r["status"] == "failed")
        print(f"jitkern prebuild: {failed} artifacts failed; first: {first['op']}/{first['variant']} for "
              f"{first['arch']}: {(first['error'] or '').splitlines()[0] if first['error'] else ''}"
              + ("" if args.keep_going else " (use --keep-going to exit 0 anyway)"), file=sys.stderr)
        return EXIT_OK if args.keep_going else EXIT_FAILED
    return EXIT_OK


def _print_items(items, file=None) -> None:
    """Per signature and arch: its status and what covers it (or what is missing)."""
    for it in items:
        what = ", ".join(it.covered_by) or (f"{it.missing[0].config.describe()} is not in the cache" if it.missing
                                            else it.error or "-")
        print(f"{it.arch.name:<7} {it.status:<9} {it.signature}\n{'':<17} -> {what}", file=file)


def _run_prebuild_manifest(args) -> int:
    """``jitkern prebuild --manifest FILE --arch LIST``: build exactly what the manifest's signatures
    run on each arch (``jitkern.coverage.prebuild_manifest``); report per signature and arch which
    config covers it. Exit 0 when every signature is covered, 1 if any is not, 130 if interrupted."""
    as_json = getattr(args, "json", False)
    out = sys.stderr if as_json else sys.stdout  # with --json, stdout holds only the report
    progress = "none" if as_json and args.progress in ("auto", "lines") else args.progress

    def started(man, arches, where) -> None:
        print(f"jitkern prebuild: {len(man)} signatures of {', '.join(man.ops())} from {man.path} for "
              f"{', '.join(a.name for a in arches)} into {where}", flush=True, file=out)

    res = coverage.prebuild_manifest(args.manifest, args.arch, args.op, args.cache_dir, args.jobs,
                                     PrebuildDisplay(progress, announce=False), started)
    items, artifacts, rec, seconds = res.items, res.artifacts, res.record, res.seconds
    if args.report or as_json:
        report = res.report()
        if args.report:
            _write_report(args.report, report)
        if as_json:
            print(json.dumps(report, indent=1, default=str))
    if not as_json:
        _print_items(items)
        print_prebuild_summary(prebuild.summarize(artifacts))
    c = rec["counts"]
    built = sum(1 for r in artifacts if r["status"] == "built")
    if res.interrupted:
        print(f"jitkern prebuild: interrupted after {seconds:.1f} s; {built} built (no partial entries were left; "
              "run again to finish)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"jitkern prebuild: {len(artifacts)} artifacts ({built} built) cover {c['covered'] + c['empty']} of "
          f"{len(items)} signature x arch pairs in {seconds:.1f} s"
          + ("" if rec["complete"] else f"; {c['uncovered'] + c['error']} NOT covered (listed above)"), file=out)
    return EXIT_OK if rec["complete"] or args.keep_going else EXIT_FAILED


# ---- record ------------------------------------------------------------------------------------
def _add_record(sub) -> None:
    p = _parser(sub, "record", help="run a command and record every call signature its ops see into a manifest",
                description="Run CMD with JITKERN_RECORD=FILE: each process appends every distinct call "
                            "signature (op, dtypes, shapes, strides, flags) once, as JSON lines. "
                            "'jitkern prebuild --manifest FILE --arch ...' then builds exactly those.")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="manifest to append to (created if missing)")
    p.add_argument("--fresh", action="store_true", help="empty FILE first instead of appending to it")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command to run")
    p.set_defaults(func=_run_record)


def _run_record(args) -> int:
    import subprocess

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
    p = _parser(sub, "list", help="ops, their variants, parameters and supported arches")
    p.set_defaults(func=_run_list)


def _value_order(v):
    """Numbers in numeric order, then everything else by its text (``64, 128, 256, 1024``)."""
    if isinstance(v, bool):
        return (1, str(v))
    if isinstance(v, (int, float)):
        return (0, v)
    return (1, str(v))


def describe_ops() -> list[dict]:
    """Ops, variants, parameter values and configuration counts per arch (used by ``jitkern list``)."""
    out = []
    for name in registry.names():
        try:
            spec = registry.get(name)
        except JitkernError as e:
            out.append({"op": name, "error": str(e)})
            continue
        per_arch: dict[str, int] = {}
        params: dict[str, dict[str, set]] = {}
        errors: dict[str, str] = {}
        for a in arch.ARCHES.values():
            try:
                cfgs = list(spec.configs(a))
            except JitkernError as e:
                cfgs = []
                errors[a.name] = str(e)
            if cfgs:
                per_arch[a.name] = len(cfgs)
            for c in cfgs:
                vp = params.setdefault(c.variant, {})
                for k, v in c.params:
                    vp.setdefault(k, set()).add(v)
        doc = plain(spec.doc or "").strip().splitlines()
        if doc and doc[0].startswith(f"{name}:"):
            doc[0] = doc[0][len(name) + 1:].strip()
        rec = {
            "op": name,
            "summary": doc[0] if doc else "",
            "variants": [{"name": v.name, "kind": v.kind, "kernel": v.kernel,
                          "params": {k: sorted(vals, key=_value_order) for k, vals in params.get(v.name, {}).items()}}
                         for v in spec.variants],
            "configs_per_arch": per_arch,
        }
        if errors:
            rec["config_errors"] = errors
        out.append(rec)
    return out


def _run_list(args) -> int:
    ops = describe_ops()
    if args.json:
        print_json(ops)
        return EXIT_OK
    for op in ops:
        if "error" in op:
            print(f"{op['op']}: cannot be loaded: {op['error']}")
            continue
        print(f"{op['op']}: {op['summary']}")
        archs = ", ".join(f"{a} ({n} configs)" for a, n in op["configs_per_arch"].items())
        print(f"  arches: {archs or '(none)'}")
        for a, e in op.get("config_errors", {}).items():
            print(f"  {a}: error: {e}")
        for v in op["variants"]:
            print(f"  variant {v['name']} [{v['kind']}] kernel {v['kernel']}")
            for k, vals in v["params"].items():
                print(f"    {k}: {', '.join(map(str, vals))}")
    return EXIT_OK


# ---- doctor ------------------------------------------------------------------------------------
def _add_doctor(sub) -> None:
    p = _parser(sub, "doctor", help="detected arch, toolchains and versions, cache layers, op routes")
    p.set_defaults(func=_run_doctor)


def print_section(sec: dict[str, Any], file=None) -> None:
    """Title, then ``label  text`` rows, text wrapped at word boundaries to the terminal width."""
    file = file or sys.stdout
    total = terminal_width()
    for ln in textwrap.wrap(sec["title"], total, break_long_words=False, break_on_hyphens=False,
                            subsequent_indent="  "):
        print(ln, file=file)
    rows = sec["rows"]
    width = min(max((len(r["label"]) for r in rows), default=0), 40)
    for r in rows:
        label = r["label"]
        indent = 2 + width + 2
        avail = max(30, total - indent)
        lines = textwrap.wrap(r["text"], avail, break_long_words=False, break_on_hyphens=False) or [""]
        if len(label) > width:  # a long label (a path) gets its own line(s)
            for ln in textwrap.wrap(label, total - 2, break_long_words=False, break_on_hyphens=False):
                print(f"  {ln}", file=file)
            first = " " * indent + lines[0]
        else:
            first = f"  {label.ljust(width)}  {lines[0]}"
        print(first.rstrip(), file=file)
        for ln in lines[1:]:
            print(" " * indent + ln, file=file)


def _run_doctor(args) -> int:
    report: dict[str, Any] = {}
    for sec in doctor.collect():
        report[sec["key"]] = sec["data"] if "data" in sec else {r["key"]: r["value"] for r in sec["rows"]}
        if not args.json:
            print_section(sec)
    if args.json:
        print_json(report)
    return EXIT_OK


# ---- config ------------------------------------------------------------------------------------
def _add_config(sub) -> None:
    p = _parser(sub, "config", help="every JITKERN_* setting: effective value and where it came from",
                description="Print every setting of the registry (jitkern.settings) with its effective value "
                            "and its source: default, env (an environment variable) or override. "
                            "Reference: docs/settings.md.")
    p.set_defaults(func=_run_config)


def _run_config(args) -> int:
    rows = settings.describe()
    if args.json:
        print_json({"settings": rows, "tile_overrides": _tile_overrides()})
        return EXIT_OK
    width = max(len(r["env"]) for r in rows)
    for r in rows:
        print(f"{r['env'].ljust(width)}  {doctor.setting_text(r)}")
    tiles = _tile_overrides()
    print(f"{'JITKERN_<OP>_<PARAM>'.ljust(width)}  "
          + (", ".join(f"{k}={v}" for k, v in tiles.items()) + "  [env]" if tiles else "(none set)"))
    bad = [r for r in rows if isinstance(r["value"], dict)]
    return EXIT_USAGE if bad else EXIT_OK


def _tile_overrides() -> dict[str, str]:
    out: dict[str, str] = {}
    for op in registry.names():
        out.update(settings.tile_overrides(op))
    return dict(sorted(out.items()))


# ---- cache -------------------------------------------------------------------------------------
def _add_cache(sub) -> None:
    p = _parser(sub, "cache", help="inspect and manage the on-disk cache")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    _parser(csub, "stats", help="entries and bytes per layer, arch and op; recorded build failures")
    v = _parser(csub, "verify", help="check every entry's checksums (exit 1 on damage)")
    v.add_argument("--discard", action="store_true", help="also remove damaged entries from writable layers")
    pr = _parser(csub, "prune", help="remove least recently used entries until the cache fits a size")
    pr.add_argument("--max-size", type=size_arg, metavar="SIZE",
                    help="e.g. 20GB (10**9 bytes) or 20GiB (2**30); default: JITKERN_CACHE_MAX_SIZE")
    c = _parser(csub, "clear", help="remove every entry of the writable layer")
    c.add_argument("--failures", action="store_true", help="only recorded build failures")
    c.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    e = _parser(csub, "export", help="write every entry of every layer into one archive, or into a wheel")
    e.add_argument("file", metavar="FILE", help="archive to write (.tar, .tar.gz); with --wheel: a directory "
                                                "or a .whl path")
    e.add_argument("--sign-key", metavar="PATH", help="Ed25519 private key (jitkern cache keygen): sign the bundle "
                                                      "and every entry in it; default: JITKERN_CACHE_SIGN_KEY")
    e.add_argument("--wheel", metavar="DIST_NAME", help="build a wheel that installs a read-only cache layer "
                                                        "(entry point jitkern.cache_layers); needs jitkern[wheel]")
    e.add_argument("--version", dest="wheel_version", metavar="V", help="the wheel's version (with --wheel)")
    i = _parser(csub, "import", help="add the entries of an archive to the writable layer (verified, atomic)")
    i.add_argument("file", metavar="FILE", help="archive made by 'jitkern cache export'")
    i.add_argument("--verify-key", metavar="PATH.pub", help="refuse the bundle unless it is signed by this Ed25519 "
                                                            "public key, unchanged; default: JITKERN_CACHE_VERIFY_KEY")
    kg = _parser(csub, "keygen", help="write a new Ed25519 signing key: PATH (private, 0600) and PATH.pub")
    kg.add_argument("path", metavar="PATH")
    pu = _parser(csub, "push", help="upload every local entry the remote cache lacks (JITKERN_REMOTE_CACHE)")
    pu.add_argument("--overwrite", action="store_true", help="replace entries the remote already has")
    pl = _parser(csub, "pull", help="download every remote entry missing locally (checked before it is stored)")
    for q in (pu, pl):
        q.add_argument("--remote", metavar="URL", help="redis://host:port/db; default: JITKERN_REMOTE_CACHE "
                                                       "(signing: JITKERN_REMOTE_CACHE_KEY)")
    ck = _parser(csub, "check", help="exit 1 listing every manifest signature the cache cannot serve "
                                     "without compiling")
    ex = _parser(csub, "explain", help="for every manifest signature the cache cannot serve: the nearest "
                                       "entry and the key parts in which it differs")
    for q in (ck, ex):
        q.add_argument("--manifest", required=True, metavar="FILE", help="signatures recorded by JITKERN_RECORD")
        q.add_argument("--arch", type=arch_list, metavar="LIST", help="comma-separated arches; default: the detected GPU")
    p.set_defaults(func=_run_cache)


def _run_cache_check(args) -> int:
    """``jitkern cache check --manifest FILE --arch LIST``: exit 1 listing every signature the cache
    (all layers) cannot serve without compiling; 0 when it serves them all."""
    items, _ = coverage.check_manifest(args.manifest, args.arch, args.cache_dir)
    bad = [it for it in items if it.status not in ("covered", "empty")]
    if getattr(args, "json", False):
        print(json.dumps({"complete": not bad, "counts": coverage.counts(items),
                          "signatures": [it.report() for it in items]}, indent=1, default=str))
        return 1 if bad else 0
    for it in bad:
        what = f"needs {it.missing[0].describe()}" if it.missing else it.error
        print(f"not covered: {it.arch.name}: {it.signature}: {what}")
    c = coverage.counts(items)
    print(f"jitkern cache check: {c['covered'] + c['empty']} of {len(items)} signature x arch pairs are served "
          f"from the cache" + (f"; {len(bad)} would compile (or cannot run); 'jitkern cache explain' says why"
                               if bad else ""))
    return 1 if bad else 0


def _run_cache_explain(args) -> int:
    """``jitkern cache explain --manifest FILE --arch LIST``: for every signature the cache cannot serve,
    the nearest entry and the key parts in which it differs (what ``JITKERN_STRICT`` would say)."""
    items, store = coverage.check_manifest(args.manifest, args.arch, args.cache_dir)
    reports = coverage.explain(items, store)
    bad = [r for r in reports if r["status"] not in ("covered", "empty")]
    if getattr(args, "json", False):
        print(json.dumps({"complete": not bad, "signatures": reports}, indent=1, default=str))
        return 1 if bad else 0
    for r in bad:
        print(f"{r['arch']}: {r['describe']}")
        print(f"  {r.get('explanation') or r.get('error')}")
    print(f"jitkern cache explain: {len(reports) - len(bad)} of {len(reports)} signature x arch pairs are served "
          f"from the cache" + (f"; {len(bad)} explained above" if bad else ""))
    return 1 if bad else 0


def _run_cache(args) -> int:
    action = args.cache_command
    if action in ("check", "explain"):
        return _run_cache_check(args) if action == "check" else _run_cache_explain(args)
    store = Store(check_dirs(configured_layers(args.cache_dir)))
    say = (lambda *a, **k: None) if args.json else print
    if action in ("push", "pull"):
        import time

        r = remote.from_env(getattr(args, "remote", None))
        remote.check_url(r.url)  # a malformed URL is the user's to fix: one line, exit 2
        t0 = time.perf_counter()
        counts = remote.push(r, store, overwrite=args.overwrite) if action == "push" else remote.pull(r, store)
        dt = time.perf_counter() - t0
        result = {"action": action, "remote": remote.redact(r.url), "seconds": round(dt, 3), **counts}
        say(f"jitkern cache {action}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
            + f" ({result['remote']}, {dt:.1f} s)")
        code = EXIT_FAILED if counts.get("damaged") or counts.get("rejected") else EXIT_OK
    elif action == "stats":
        import time

        result = cachectl.stats(store)
        for info in result["layers"]:
            role = "writable" if info["writable"] else "read-only"
            if info.get("installed_from"):
                role = f"installed by {info['installed_from']}, read-only"
            say(f"{info['path']} ({role}): {info['entries']} entries, "
                f"{human_size(info['bytes'])}, {info['failures']} recorded failures, "
                f"{info['rejected_over_budget']} rejected over budget")
            if "evictions" in info:
                ev = info["evictions"]
                cap = human_size(info["max_size"]) if info["max_size"] else f"none ({evict.ENV_MAX_SIZE} not set)"
                last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["last"])) if ev["last"] else "never"
                say(f"  size cap {cap}; evicted {ev['entries']} entries ({human_size(ev['bytes'])}) so far, "
                    f"last {last}")
            for group, title in (("per_arch", "arch"), ("per_op", "op")):
                if info[group] and not args.json:
                    print_table([[k, v["entries"], human_size(v["bytes"])] for k, v in sorted(info[group].items())],
                                [f"  {title}", "entries", "size"])
            if info.get("prebuilds"):
                say(f"  last prebuild: {cachectl.describe_prebuild(info['prebuilds'][-1])}")
        code = EXIT_OK
    elif action == "verify":
        checked, damaged = cachectl.verify(store, discard=args.discard)
        for d in damaged:
            say(f"DAMAGED {d['key']} in {d['layer']}: {d['error']}" + (" (discarded)" if d["discarded"] else ""))
        say(f"jitkern cache verify: {checked} entries checked, {len(damaged)} damaged")
        result = {"checked": checked, "damaged": damaged}
        code = EXIT_FAILED if damaged else EXIT_OK
    elif action == "prune":
        result = cachectl.prune(store, args.max_size)
        say(f"jitkern cache prune: {result['layer']}: {human_size(result['bytes_before'])} -> "
            f"{human_size(result['bytes_after'])} (limit {human_size(result['max_size'])}); removed "
            f"{result['removed']} least recently used entries, kept {result['kept_in_use']} that other processes hold")
        code = EXIT_OK
        if not result["fits"]:
            print("jitkern cache prune: the cache still exceeds the limit because the remaining entries are in use",
                  file=sys.stderr)
            code = EXIT_FAILED
    elif action == "clear":
        result = _clear(store, args, say)
        code = EXIT_OK
    elif action == "export":

        if args.wheel_version and not args.wheel:
            raise ConfigError("--version applies to --wheel DIST_NAME exports only")
        sign_key = cachectl._sign_key(args.sign_key)
        if args.wheel:
            if not args.wheel_version:
                raise ConfigError("--wheel needs --version V (the wheel's version, e.g. 1.0)")
            result = cachewheel.export_wheel(store, args.wheel, args.wheel_version, args.file, sign_key)
        else:
            result = cachectl.export(store, args.file, sign_key)
        for s in result["skipped_damaged"]:
            print(f"skipped damaged entry {s['key']} in {s['layer']}: {s['error']}", file=sys.stderr)
        result["bytes"] = os.path.getsize(result["file"])
        signed = f", signed by key {result['signed_by']}" if result.get("signed_by") else ""
        say(f"jitkern cache export: {result['entries']} entries -> {result['file']} "
            f"({human_size(result['bytes'])}{signed})")
        code = EXIT_FAILED if result["skipped_damaged"] else EXIT_OK
    elif action == "import":
        result = cachectl.import_archive(store, args.file, cachectl._verify_keys(args.verify_key))
        for x in result["refused"]:
            print(f"refused {x.get('key') or x.get('member')}: {x['error']}", file=sys.stderr)
        signed = f" (bundle signed by key {result['signed_by']})" if result.get("signed_by") else ""
        say(f"jitkern cache import: {result['installed']} entries installed, {result['already_present']} already "
            f"present, {len(result['refused'])} refused -> {result['layer']}{signed}")
        code = EXIT_FAILED if result["refused"] else EXIT_OK
    else:  # keygen

        priv, pub = signing.keygen(args.path)
        kid = signing.key_id(signing.load_public(pub))
        result = {"private": str(priv), "public": str(pub), "key_id": kid}
        say(f"jitkern cache keygen: private key {priv} (mode 0600; builders: JITKERN_CACHE_SIGN_KEY), "
            f"public key {pub} (readers: JITKERN_CACHE_VERIFY_KEY); key id {kid}")
        code = EXIT_OK
    if args.json:
        print_json(result)
    return code


def _clear(store, args, say) -> dict[str, Any]:
    """``cache clear``: never creates a missing directory; ``--dry-run`` removes nothing."""
    layer, keys = cachectl.clear_targets(store, failures_only=args.failures)
    what = "recorded failures" if args.failures else "entries"
    result = {"layer": str(layer.base), "exists": layer.root.is_dir(), "failures_only": args.failures,
              "dry_run": args.dry_run, "keys": keys, "removed": 0}
    if not result["exists"]:
        say(f"jitkern cache clear: nothing to clear: {layer.base} holds no jitkern cache")
    elif args.dry_run:
        for k in keys:
            say(f"would remove {k}")
        say(f"jitkern cache clear: would remove {len(keys)} {what} from {layer.base} (dry run: nothing removed)")
    else:
        result["removed"] = cachectl.clear(store, failures_only=args.failures) if keys else 0
        say(f"jitkern cache clear: removed {result['removed']} {what} from {layer.base}")
    return result


# ---- tune --------------------------------------------------------------------------------------
def _add_tune(sub) -> None:
    p = _parser(sub, "tune", help="benchmark an op's tile candidates on this GPU and keep the winners",
                description="Time every candidate that passes the arch rules and budget for each shape "
                            "bucket, and persist the winner per (arch, op, dtype, bucket, compiler "
                            "fingerprint) in the cache; later processes use it without retuning.")
    p.add_argument("--op", required=True, metavar="NAME", help="op to tune, e.g. gemm")
    p.add_argument("--shapes", required=True, metavar="LIST",
                   help="comma-separated shapes, sizes joined by 'x' (gemm: MxNxK), e.g. 4096x4096x4096,16x4096x4096")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="input dtype (default: bf16)")
    p.add_argument("--b-trans", action="store_true", help="gemm: B is a transposed row-major [N, K] weight")
    p.add_argument("--force", action="store_true", help="retune buckets that already have a record")
    p.add_argument("--exact", action="store_true",
                   help="one record per shape the op keys exactly (gemm: per weight N x K, looked up before the "
                        "bucket's), instead of per bucket")
    p.set_defaults(func=_run_tune)


def _run_tune(args) -> int:
    """Tune, then print one line (or the JSON records) per bucket."""
    strict.suspend()  # tuning compiles its candidates on purpose
    cache = {"cache_dir": args.cache_dir} if getattr(args, "cache_dir", None) is not None else {}
    with settings.override(**cache):
        records = tuning.tune_op(args.op, tuning.parse_shapes(args.shapes), args.dtype, b_trans=args.b_trans,
                                 force=args.force, exact=args.exact)
    if args.json:
        print(json.dumps(records, indent=1, sort_keys=True, default=str))
        return 0
    rows = [[r["bucket"], " ".join(f"{k}={v}" for k, v in sorted(r["params"].items())), f"{r['ms']:.4f}",
             sum("ms" in x for x in r["results"]), sum("rejected" in x for x in r["results"]), r.get("created", "")]
            for r in records]
    print_table(rows, ["bucket", "winner", "ms", "timed", "over budget", "tuned"])
    return 0


#: Subcommand registrars, in the order ``jitkern --help`` lists them.
SUBCOMMANDS: list[Callable] = [_add_prebuild, _add_record, _add_list, _add_doctor, _add_config, _add_cache, _add_tune]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jitkern", description="JIT kernel compilation with an on-disk cache.",
                                     epilog="Global options go before or after the command. Reference: docs/cli.md")
    parser.add_argument("--version", action="version", version=f"jitkern {__version__}")
    _global_options(parser, top=True)
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


_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _oserror_text(e: OSError) -> str:
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version: 0; bad arguments: 2 (argparse printed why)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    quiet_third_party_warnings()
    _setup_logging(args.verbose + getattr(args, "verbose_after", 0))
    command = args.command + (f" {args.cache_command}" if getattr(args, "cache_command", None) else "")
    try:
        check_cache_dir(args.cache_dir)
        scope = settings.override(cache_dir=args.cache_dir) if args.cache_dir is not None else contextlib.nullcontext()
        with scope:
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("jitkern: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UnknownArchError, SpecError, ConfigError) as e:  # what the user asked for is not valid
        print(f"jitkern {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except JitkernError as e:
        print(f"jitkern {command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except _PATH_ERRORS as e:  # a path the user gave (or its parent) is not usable
        print(f"jitkern {command}: error: {_oserror_text(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, I/O error: not the user's argument
        print(f"jitkern {command}: error: {_oserror_text(e)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
