"""Exception types raised by jitkern.

Every error says what was wrong and what to do about it. Input errors also derive from the
matching built-in (``TypeError``/``ValueError``) so callers that already catch those keep working.
"""
import errno


class JitkernError(Exception):
    """Base class of every error jitkern raises on purpose."""


# --- arch ---------------------------------------------------------------------------------------
class ArchError(JitkernError):
    """The target GPU architecture could not be determined or is not supported."""


class UnknownArchError(ArchError, ValueError):
    """An arch name (JITKERN_ARCH, --arch, or a detected GPU) is not in jitkern's arch table."""


class NoDeviceError(ArchError, RuntimeError):
    """No GPU was found and no arch was named."""


# --- specs and templates ------------------------------------------------------------------------
class SpecError(JitkernError, ValueError):
    """An op spec is malformed (duplicate names, unknown variant, bad parameter)."""


class UnknownOpError(SpecError, KeyError):
    """No op of that name is registered."""

    def __str__(self):  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ConfigError(JitkernError, ValueError):
    """A configuration value (environment variable, tile parameter) is not allowed."""


class TemplateError(JitkernError):
    """A kernel template could not be rendered (missing file, undefined variable, syntax)."""


# --- build, cache, launch -----------------------------------------------------------------------
class BuildError(JitkernError, RuntimeError):
    """A variant could not be compiled. ``log_path`` points at the full compiler log if kept.

    ``transient``: the failure says nothing about the variant (disk full, permission, timeout,
    interrupted, worker died; see ``is_transient``), so it is never recorded and the next process
    tries again."""

    def __init__(self, message, log_path=None, *, reason=None, log_text=None, transient=False):
        super().__init__(message)
        self.log_path = log_path
        self.reason = reason or str(message)  # one line for warnings: e.g. the first compiler error
        self.log_text = log_text  # the full compiler output, kept with the failure record
        self.transient = bool(transient)


class UnavailableError(BuildError):
    """A variant cannot be built on this machine (its compiler, headers or GPU are missing)."""


class RecordedBuildFailure(BuildError):
    """A variant's build failed earlier and the failure is recorded in the cache for this key, so it
    is not retried until the toolchain changes or failures are cleared (``jitkern cache clear --failures``)."""


class NoVariantError(BuildError):
    """No variant of an op could run these inputs (every one unavailable, failed, or refused by a guard)."""


class OverBudgetError(BuildError):
    """A configuration compiled but uses more shared memory/LDS (or registers) than the arch allows.

    It is never launched; ``figures`` holds what it uses and the budget (see ``jitkern.budget``).
    """

    def __init__(self, message, figures=None):
        super().__init__(message)
        self.figures = dict(figures or {})


class CacheError(JitkernError, OSError):
    """The cache directory cannot be used (permissions, layout)."""


class CorruptEntryError(CacheError):
    """A cache entry failed verification. It is discarded and rebuilt, never loaded."""


class InsecureCacheError(CacheError):
    """A cache directory could be changed by another user, or links out of the cache: jitkern refuses
    to load from it, since a loaded kernel runs with the user's rights. The message says how to fix it."""


class SignatureError(CacheError):
    """A signature is missing, made by a key that is not trusted, or does not match what it signs."""


class RemoteCacheError(CacheError):
    """The remote cache (``JITKERN_REMOTE_CACHE``) cannot be used: misconfigured, unreachable, full.
    Builds never raise it (they go on without the remote, with one warning); ``jitkern cache push/pull`` do."""


class RemoteValueTooLarge(RemoteCacheError):
    """A remote entry is larger than ``JITKERN_REMOTE_MAX_VALUE``: it is not downloaded (or published)."""


class UntrustedEntryError(RemoteCacheError):
    """An entry from the remote cache failed its checksum or signature check; it is never stored or loaded."""


class CacheMissError(JitkernError, RuntimeError):
    """``JITKERN_STRICT=1``: a kernel the process needs is in no cache layer and would be compiled at run
    time. The message names the op, config and arch and the key parts in which the nearest cached entry
    differs. Attributes: ``op``, ``config``, ``arch``, ``key``, ``differences`` (lines, old -> new),
    ``nearest`` (path of the nearest entry, or None). Deliberately not a ``BuildError``: no fallback
    variant is tried in its place."""

    def __init__(self, message, *, op=None, config=None, arch=None, key=None, differences=(), nearest=None):
        super().__init__(message)
        self.op, self.config, self.arch, self.key = op, config, arch, key
        self.differences, self.nearest = tuple(differences), nearest


class LaunchError(JitkernError, RuntimeError):
    """A compiled kernel could not be loaded or launched on this device."""


# --- inputs -------------------------------------------------------------------------------------
class InputError(JitkernError):
    """An op was called with arguments it does not accept."""


class DTypeError(InputError, TypeError):
    """A tensor has a dtype the op does not accept."""


class DeviceError(InputError, ValueError):
    """A tensor is on a device the op cannot run on, or tensors are on different devices."""


class ShapeError(InputError, ValueError):
    """A tensor has the wrong number of dimensions or sizes that do not match."""


class LayoutError(InputError, ValueError):
    """A tensor's strides or alignment are not what the kernel requires."""


class ArgumentError(InputError, ValueError):
    """A non-tensor argument (``eps``, a size, a flag) has a type or value the op does not accept."""


# --- buffer contracts and redzone debug mode (jitkern/contracts.py, jitkern/redzone.py) -----------
class BufferError(InputError, ValueError):
    """A caller-provided output/workspace tensor breaks the kernel's buffer contract (too small,
    wrong dtype, wrong device or layout). The message names the buffer, the expected and given size."""


class TableError(InputError, ValueError):
    """JITKERN_DEBUG=checks (or redzone): a table's contents break the op's contract, which is the
    caller's on the hot path (an index outside the KV cache, ``cu_seq_lens`` inconsistent with
    ``num_tokens``, a sentinel that is not the op's). Raised before any launch. Attributes: ``op``,
    ``argument``, ``index`` (the first bad position, a tuple), ``value`` and ``allowed`` (in words)."""

    def __init__(self, message, *, op=None, argument=None, index=None, value=None, allowed=None):
        super().__init__(message)
        self.op, self.argument, self.index, self.value, self.allowed = op, argument, index, value, allowed


class RedzoneError(JitkernError, RuntimeError):
    """JITKERN_DEBUG=redzone: a launch wrote outside a buffer it was given (into the guard band).
    Attributes: ``op``, ``variant``, ``buffer``, ``offset`` (bytes past the end of the buffer, or
    negative before its start; for row-guarded buffers, past the end of ``row``)."""

    def __init__(self, message, *, op=None, variant=None, buffer=None, offset=None, row=None):
        super().__init__(message)
        self.op, self.variant, self.buffer, self.offset, self.row = op, variant, buffer, offset, row


# --- the one rule: transient or permanent failure -------------------------------------------------
#: errno values that describe the machine at this moment, not the variant being built.
_TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EINTR", "ETIMEDOUT", "EAGAIN", "ENOMEM", "EMFILE", "ENFILE",
    "EBUSY", "ESTALE", "EIO", "EPIPE") if hasattr(errno, name))
#: Compiler output that means the same when a compiler reports it in text instead of an errno.
_TRANSIENT_TEXT = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                   "Cannot allocate memory", "Too many open files", "Resource temporarily unavailable")
_TRANSIENT_TYPES = ("TimeoutError", "InterruptedError", "KeyboardInterrupt", "MemoryError", "TimeoutExpired",
                    "BrokenProcessPool")


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (a build failure) is about the machine, not the variant: a full disk or quota,
    a permission or read-only filesystem, a timeout, an interrupt, memory, a worker process that died.
    Such failures are never recorded as failed builds (``jitkern.failures.record_failure``) and
    prebuild reports them as transient; everything else (a compiler error, a template that does not
    import) is permanent for this key. Looks at ``exc`` and the exceptions it was raised from."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 16:
        seen += 1
        if getattr(e, "transient", False):
            return True
        if any(t.__name__ in _TRANSIENT_TYPES for t in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    text = f"{exc} {getattr(exc, 'log_text', '') or ''}"
    return isinstance(exc, BuildError) and not isinstance(exc, UnavailableError) and any(
        t in text for t in _TRANSIENT_TEXT)
