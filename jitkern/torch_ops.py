"""Register jitkern ops with ``torch.library``, so ``torch.compile`` and CUDA graphs see them.

Every op becomes the custom op ``torch.ops.jitkern.<name>``, built from data its ``OpSpec`` declares
(``mutates``, ``outputs``, ``alloc``, ``fake``; see ``jitkern.spec.OpSpec``): the schema is inferred
from the annotations of ``spec.fn``, in-place arguments are annotated as mutated, and the fake
(meta) implementation is derived:

* ops with ``outputs`` (``out=`` buffers, or in-place inputs they return) are registered as
  returning nothing; the fake implementation has nothing to do, and ``alloc`` provides any output
  buffer the caller did not pass, on real or fake tensors alike;
* ops returning new tensors register ``spec.fake``;
* ops annotated ``-> None`` return nothing.

``jitkern.ops.<name>`` is :func:`op_function`'s result: in eager mode the op's own function, called
with no trip through torch's dispatcher (on the H200 that trip, ``torch.ops.jitkern.rms_norm``,
costs 15-20 us a call more: more than two whole small-kernel launches); under ``torch.compile``,
Dynamo traces the custom-op call instead, which it puts in the graph as one node. Both run the same
code: the custom op's implementation calls ``spec.fn``.

How Dynamo is pointed at the custom op without a wrapper in the eager path: a function with a
``_torchdynamo_inline`` attribute is traced as that attribute's function (the hook
``torch.compile`` itself uses when one compiled function calls another), and setting it needs no
import of ``torch._dynamo`` (seconds). It is torch-internal, so it is used only on torch versions it
has been checked on (``INLINE_HOOK_SINCE`` and later: the tests trace both ways of calling an op);
elsewhere, and for callables that are not plain functions, ``jitkern.ops.<name>`` is a wrapper
that asks ``torch.compiler.is_compiling()`` (about 0.4 us more a call). One difference: with the
hook, compile the function that calls the op, not the op function by itself.

Registration is lazy: looking an op up checks its declarations (the annotations, and the schema
torch would infer from them) but registers nothing, because ``torch.library.custom_op`` costs about
1.5 ms an op on torch 2.13 (more on 2.11) that an eager model never uses. The op is registered the
first time ``torch.ops.jitkern.<name>`` is asked for: the ``jitkern`` namespace of ``torch.ops`` is
given a subclass whose attribute lookup registers a known op it does not find yet. What Dynamo
traces in place of the op function looks the op up there, and Dynamo looks attributes of modules up
for real while it traces, so the first trace of a call registers the op; so does a direct call
through ``torch.ops.jitkern.<name>``, for built-in, registered and entry-point ops alike. Where the
namespace cannot be given that subclass (``LAZY_NAMESPACE`` false), lookup registers at once.
"""
from __future__ import annotations

import functools
import inspect
import threading
import typing

import torch

from .errors import SpecError
from .logs import warn_once
from .spec import OpSpec
from . import registry

NAMESPACE = "jitkern"

_ops: dict[str, object] = {}
_functions: dict[str, tuple] = {}
#: Specs whose op function was handed out but which are not registered yet: what a lookup of
#: ``torch.ops.jitkern.<name>`` registers (ops not in here come from ``jitkern.registry``).
_pending: dict[str, OpSpec] = {}
#: Names being registered (under _lock): a lookup of one of these in torch.ops.jitkern registers nothing.
_registering: set[str] = set()
_lock = threading.RLock()  # re-entrant: registering looks the new op up in torch.ops.jitkern


def _signature(spec: OpSpec) -> inspect.Signature:
    try:
        sig = inspect.signature(spec.fn, eval_str=True)
    except Exception as e:  # annotation naming something the module does not define
        raise SpecError(f"op {spec.name!r}: the annotations of {spec.fn.__qualname__} cannot be resolved "
                        f"({type(e).__name__}: {e}); annotate with torch.Tensor, Optional[torch.Tensor], "
                        f"float, int, bool") from e
    names = set(sig.parameters)
    for field in ("mutates", "outputs"):
        unknown = [n for n in getattr(spec, field) if n not in names]
        if unknown:
            raise SpecError(f"op {spec.name!r}: {field} names {unknown}, which are not parameters of "
                            f"{spec.fn.__qualname__}{sig}")
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise SpecError(f"op {spec.name!r}: {spec.fn.__qualname__} takes *{p.name}; a registered op needs "
                            f"named, annotated parameters")
        if p.annotation is p.empty:
            raise SpecError(f"op {spec.name!r}: parameter {p.name!r} of {spec.fn.__qualname__} has no type "
                            f"annotation; torch.library infers the op's schema from the annotations")
    optional_outputs = [n for n in spec.outputs if sig.parameters[n].default is None]
    if optional_outputs and spec.alloc is None:
        raise SpecError(f"op {spec.name!r}: outputs {optional_outputs} default to None but the spec declares no "
                        f"alloc(**arguments) -> {{name: tensor}} to allocate them")
    return sig


def _returns_new_tensors(spec: OpSpec, sig: inspect.Signature) -> bool:
    if spec.outputs:
        return False
    if sig.return_annotation is None or sig.return_annotation is type(None):
        return False
    if spec.fake is None:
        raise SpecError(f"op {spec.name!r}: {spec.fn.__qualname__} returns something, but the spec declares "
                        f"neither outputs (the parameters it returns) nor fake (a function computing the shapes "
                        f"of new output tensors); annotate it '-> None' if it returns nothing")
    return True


def register(spec: OpSpec):
    """``torch.ops.jitkern.<spec.name>`` for ``spec`` (registered on first call; idempotent)."""
    with _lock:
        op = _ops.get(spec.name)
        if op is not None:
            return op
        sig = _signature(spec)
        returns = _returns_new_tensors(spec, sig)
        fn = spec.fn
        if returns:
            def impl(*args, **kwargs):
                return fn(*args, **kwargs)
        else:
            def impl(*args, **kwargs):
                fn(*args, **kwargs)
            sig = sig.replace(return_annotation=None)
        impl.__signature__ = _schema_signature(spec, sig)
        impl.__name__ = spec.name
        impl.__doc__ = fn.__doc__
        _registering.add(spec.name)  # torch.library looks the name up in torch.ops.jitkern first
        try:
            op = torch.library.custom_op(f"{NAMESPACE}::{spec.name}", impl, mutates_args=spec.mutates)
        finally:
            _registering.discard(spec.name)
        if returns:
            op.register_fake(spec.fake)
        else:
            def fake(*args, **kwargs):
                return None
            op.register_fake(fake)
        _ops[spec.name] = op
        _pending.pop(spec.name, None)
        return op


def _schema_signature(spec: OpSpec, sig: inspect.Signature) -> inspect.Signature:
    """``sig`` without defaults up to the last in-place argument that defaults to None.

    torch's dispatcher drops trailing arguments equal to their defaults before the in-place kernel of a
    mutating custom op runs, and torch 2.11's kernel then reads the mutated ones by position
    (``args[i]``): an op whose last parameter is an optional in-place buffer passed as None
    (paged_attention_decode's ``workspace``) failed under torch.compile on the H200. Without a default,
    nothing is dropped. Calls through ``jitkern.ops`` pass every argument; a direct
    ``torch.ops.jitkern.<name>(...)`` call passes those up to that one too."""
    params = list(sig.parameters.values())
    last = max((i for i, p in enumerate(params) if p.name in spec.mutates and p.default is None), default=-1)
    return sig.replace(parameters=[p.replace(default=inspect.Parameter.empty) if i <= last else p
                                   for i, p in enumerate(params)])


def registered(name: str):
    """The custom op registered for ``name``, or None."""
    return _ops.get(name)


def op_function(spec: OpSpec):
    """What ``jitkern.ops.<name>`` is: ``spec.fn`` in eager mode, the custom op under torch.compile.

    Registers nothing where the namespace is lazy (see the module docstring): the custom op is made
    when a trace or a direct ``torch.ops.jitkern.<name>`` first asks for it. An op whose spec cannot
    be registered (unannotated parameters, no ``outputs``/``fake``, a type torch.library has no
    schema for) is returned as its plain function, with one warning saying what to declare: it runs
    eagerly, and ``torch.compile`` breaks the graph around it.
    """
    fn = spec.fn
    with _lock:
        known = _functions.get(spec.name)
        if known is not None and known[0] is spec:
            return known[1]
    try:
        sig = _signature(spec)
        _check_schema(spec, sig)
        if _lazy_namespace():
            with _lock:
                if spec.name not in _ops:
                    _pending.setdefault(spec.name, spec)  # the first spec of a name is the registered one
        else:
            register(spec)
    except SpecError as e:
        warn_once(("torch-op", spec.name), "jitkern: op %r is not registered with torch.library, so "
                  "torch.compile will break the graph at it: %s", spec.name, e)
        return fn
    traced = _traced(spec, sig)
    if _inline_hook_works() and inspect.isfunction(fn) and not hasattr(fn, _INLINE_HOOK):
        setattr(fn, _INLINE_HOOK, traced)
        call = fn
    else:
        is_compiling = torch.compiler.is_compiling

        def call(*args, **kwargs):
            if is_compiling():
                return traced(*args, **kwargs)
            return fn(*args, **kwargs)

        call.__name__ = call.__qualname__ = spec.name
        call.__doc__ = fn.__doc__
        call.__wrapped__ = fn
        call.__signature__ = sig
    with _lock:
        _functions[spec.name] = (spec, call)
    return call


def _check_schema(spec: OpSpec, sig: inspect.Signature) -> None:
    """Raise SpecError where torch.library would refuse the op's schema (what registering checks
    first), without registering it: about 0.1 ms an op."""
    returns = _returns_new_tensors(spec, sig)
    infer = getattr(torch.library, "infer_schema", None)
    if infer is None:  # torch before 2.5: registration will say
        return

    def impl(*args, **kwargs):
        return None

    impl.__signature__ = _schema_signature(spec, sig if returns else sig.replace(return_annotation=None))
    try:
        infer(impl, mutates_args=spec.mutates)
    except Exception as e:
        raise SpecError(f"op {spec.name!r}: torch.library cannot infer a schema from {spec.fn.__qualname__}"
                        f"{sig}: {type(e).__name__}: {e}") from e


#: Whether ``torch.ops.jitkern`` registers ops on lookup (False: torch.ops is not as this module expects,
#: so ops are registered when looked up instead). Set on first use.
LAZY_NAMESPACE: bool | None = None


def _lazy_namespace() -> bool:
    """Give ``torch.ops.jitkern`` the subclass that registers known ops on lookup (once)."""
    global LAZY_NAMESPACE
    if LAZY_NAMESPACE is None:
        with _lock:
            if LAZY_NAMESPACE is None:
                LAZY_NAMESPACE = _install_namespace()
    return LAZY_NAMESPACE


def _install_namespace() -> bool:
    base = getattr(getattr(torch, "_ops", None), "_OpNamespace", None)
    if not isinstance(base, type) or "__getattr__" not in vars(base):
        return False
    ns = getattr(torch.ops, NAMESPACE)
    if type(ns) is not base:
        return isinstance(ns, _namespace_class(base))
    try:
        ns.__class__ = _namespace_class(base)  # keeps what the namespace already bound
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _namespace_class(base: type) -> type:
    class JitkernNamespace(base):
        """``torch.ops.jitkern``: a lookup of an op that is not registered yet registers it."""

        def __getattr__(self, op_name: str):
            try:
                return super().__getattr__(op_name)
            except AttributeError:
                if op_name.startswith("_"):
                    raise
                spec = _spec_to_register(op_name)
                if spec is None:
                    raise
                with _lock:  # another thread registering it: wait, then find it
                    if op_name in _registering:  # torch.library's own look-up while this thread registers it
                        raise
                    try:
                        register(spec)
                    except SpecError as e:
                        raise AttributeError(f"torch.ops.{NAMESPACE}.{op_name}: {e}") from e
            return super().__getattr__(op_name)

    JitkernNamespace.__qualname__ = JitkernNamespace.__name__
    # the base names each op it binds after its own class's module (torch._ops.jitkern.<name>), which
    # is where Inductor's cache pickling looks for it
    JitkernNamespace.__module__ = base.__module__
    return JitkernNamespace


def _spec_to_register(name: str) -> OpSpec | None:
    with _lock:
        spec = _pending.get(name)
    if spec is not None:
        return spec
    from .errors import UnknownOpError

    try:
        return registry.get(name)
    except UnknownOpError:
        return None


#: The attribute Dynamo follows from a function to the function it traces in its place.
_INLINE_HOOK = "_torchdynamo_inline"
#: The first torch release on which jitkern has checked that hook (tests/test_torch_integration.py).
INLINE_HOOK_SINCE = (2, 11)


def _inline_hook_works() -> bool:
    try:
        major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= INLINE_HOOK_SINCE


def _traced(spec: OpSpec, sig: inspect.Signature, op=None):
    """What Dynamo traces in place of ``spec.fn``: plain dict/tuple work and one custom-op call.

    ``op`` (tests): what to call instead of ``torch.ops.jitkern.<name>.default``, which is looked up
    on each call (by Dynamo, once per trace: the lookup is what registers the op)."""
    names = tuple(sig.parameters)
    name = spec.name
    namespace = getattr(torch.ops, NAMESPACE)
    defaults = tuple((n, p.default) for n, p in sig.parameters.items() if p.default is not p.empty)
    outputs = spec.outputs
    alloc = spec.alloc

    def traced(*args, **kwargs):
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        if outputs and any(bound[n] is None for n in outputs):
            made = alloc(**bound)
            for n in outputs:
                if bound[n] is None:
                    bound[n] = made[n]
        # every argument, positionally in schema order: nothing is left to the dispatcher's handling of
        # defaults and keywords (see _schema_signature for what torch 2.11 did with a dropped default)
        call = op if op is not None else getattr(namespace, name).default
        result = call(*(bound[n] for n in names))
        if not outputs:
            return result
        if len(outputs) == 1:
            return bound[outputs[0]]
        return tuple(bound[n] for n in outputs)

    traced.__name__ = traced.__qualname__ = f"{spec.name}_traced"
    return traced


def register_all(names: typing.Iterable[str] | None = None) -> dict[str, object]:
    """Register every available op (or ``names``); returns ``{name: custom op}``."""
    return {s.name: register(s) for s in registry.specs(names)}
