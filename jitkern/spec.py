"""Declarative op specs: plain dataclasses, no code strings.

An op (``OpSpec``) has variants in fallback order (``Variant``); each variant is a Jinja template
plus the runtime signature of the kernel it defines (``Arg``). A ``Config`` is one buildable point:
a variant and the values of its parameters (dtypes, feature flags, tile sizes, ``num_warps`` ...).
Everything the runtime may select for an arch is enumerated by ``OpSpec.configs(arch)``; prebuild
compiles exactly that list, so a warm cache covers every launch.

How a call runs is declared too: ``OpSpec.plan(call)`` maps one call signature to ``Candidate``s in
preference order, each a sequence of ``Launch``es (config, grid, kernel arguments, where ``In("x")``
stands for the call's argument ``x``). ``jitkern.dispatch`` runs ``plan`` once per signature and
launches the decision on every later call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import SpecError

#: Parameters that are Triton compile options rather than template variables.
COMPILE_OPTIONS = ("num_warps", "num_stages", "num_ctas")


@dataclass(frozen=True)
class Arg:
    """One runtime argument of a kernel.

    ``type`` is a Triton signature type, and may name a parameter in braces: ``"*{dtype}"`` with
    ``dtype="bf16"`` gives ``"*bf16"``. Pointer arguments are compiled as 16-byte aligned (callers
    check). ``divisible_if`` names a boolean parameter; when it is true the integer argument is
    compiled as a multiple of 16, which lets Triton vectorise address arithmetic.
    """

    name: str
    type: str
    divisible_if: str | None = None

    def resolve(self, params: Mapping[str, Any]) -> str:
        try:
            return self.type.format(**params)
        except KeyError as e:
            raise SpecError(f"argument {self.name!r} type {self.type!r} names unknown parameter {e}") from None

    @property
    def is_pointer(self) -> bool:
        return self.type.startswith("*")


@dataclass(frozen=True)
class Variant:
    """One implementation of an op: a template file relative to the op's template folder."""

    name: str
    template: str
    kernel: str  # name of the kernel function the template defines
    args: tuple[Arg, ...] = ()
    kind: str = "triton"

    def __post_init__(self):
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise SpecError(f"variant {self.name!r} has duplicate argument names: {names}")


@dataclass(frozen=True)
class Config:
    """A buildable point: variant name plus parameter values (sorted, hashable)."""

    variant: str
    params: tuple[tuple[str, Any], ...]

    @classmethod
    def make(cls, variant: str, **params) -> "Config":
        return cls(variant, tuple(sorted(params.items())))

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    def compile_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.params if k in COMPILE_OPTIONS}

    def describe(self) -> str:
        return f"{self.variant}(" + ", ".join(f"{k}={v}" for k, v in self.params) + ")"


@dataclass(frozen=True)
class In:
    """In a ``Launch``'s arguments: the call's argument ``name``, read on every call. A tensor
    becomes its device address (it must be 16-byte aligned: pointers are compiled so); a scalar
    declared in ``OpSpec.scalars`` is passed after its per-call check."""

    name: str


@dataclass(frozen=True)
class Scratch:
    """In a ``Launch``'s arguments: a temporary buffer the framework allocates for every call (on the
    call's device, through torch's caching allocator, so under CUDA-graph capture it is the graph's
    memory), for a workspace whose size only the plan knows (it follows the chosen tile). Launches
    of one candidate that name the same ``name`` share one buffer (e.g. partial results written by
    one kernel and reduced by the next)."""

    shape: tuple
    dtype: Any
    name: str = "scratch"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class Zeroed:
    """In a ``Launch``'s arguments: a buffer that is all zeros when a launch starts and that every
    launch must leave all zeros again (e.g. per-tile arrival counters, reset by the program that
    arrives last). The framework allocates and zeroes it once per (op, name, shape, dtype, device,
    stream) and keeps it for the process, so no call pays for a memset: launches on one stream run
    in order and can share it, and each stream gets its own, so kernels running concurrently on two
    streams never share one. A CUDA graph captures the buffer of its capture stream; a buffer first
    used under capture is allocated outside the graph's private pool (so torch.compile's CUDA-graph
    trees, which check their pools, accept it) and zeroed by a memset node of each graph captured
    before the buffer's first use outside capture, which zeroes it once more; replays leave it
    zeroed as every launch does. Graphs captured on one stream share it, so they must not be
    replayed concurrently on different streams. The buffers are never freed (not by
    ``jitkern.reset()`` either: a captured graph may still use them). Names share one namespace
    with ``Scratch`` within a candidate."""

    shape: tuple
    dtype: Any
    name: str = "zeroed"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class Scalar:
    """A scalar argument that may change between calls with the same tensors (``eps``, ``scale``):
    it is not part of the call signature, so it is checked on every call (cheap): converted with
    ``type`` and required to lie in ``[min, max]`` (NaN never does)."""

    type: type = float
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the config to build, the grid (1 to 3 sizes; a zero size launches
    nothing) and the kernel's arguments in its order: constants, ``In(name)`` for the call's
    argument ``name``, ``Scratch(shape, dtype)`` for a buffer allocated per call, or
    ``Zeroed(shape, dtype)`` for a kept, once-zeroed buffer each launch leaves zeroed."""

    config: Config
    grid: tuple[int, ...]
    args: tuple  # constants, In(name), Scratch(shape, dtype), Zeroed(shape, dtype)

    def __post_init__(self):
        grid = tuple(int(g) for g in self.grid)
        if not 1 <= len(grid) <= 3:
            raise SpecError(f"a launch grid has 1 to 3 sizes, got {self.grid!r}")
        object.__setattr__(self, "grid", grid + (1,) * (3 - len(grid)))
        object.__setattr__(self, "args", tuple(self.args))


@dataclass(frozen=True)
class Candidate:
    """One way to run a call signature: its launches, in order, or a PyTorch function.

    ``guard(*args) -> bool`` (no exceptions) says whether this candidate takes the arguments; it is
    asked once per call signature, which holds each tensor's type (so a tensor-subclass check belongs
    here), and must depend only on what the signature holds: tensor types, shapes, strides, dtypes and
    devices, and the arguments that are not per-call scalars (never tensor contents or per-call
    scalars). ``guard_doc`` says what it checks. ``torch``: a function taking
    the op's arguments, used instead of kernels (nothing is built); ``name`` names it.
    """

    launches: tuple[Launch, ...] = ()
    guard: Callable[..., bool] | None = None
    guard_doc: str = ""
    torch: Callable | None = None
    name: str = ""

    def __post_init__(self):
        launches = (self.launches,) if isinstance(self.launches, Launch) else tuple(self.launches)
        object.__setattr__(self, "launches", launches)
        if not launches and self.torch is None:
            raise SpecError("a Candidate needs launches or a torch function")
        if not self.name:
            object.__setattr__(self, "name", launches[0].config.variant if launches else "torch")

    @property
    def variant(self) -> str:
        return self.name


@dataclass(frozen=True)
class OpSpec:
    """An op declared once.

    name:         ``jitkern.ops.<name>``
    variants:     implementations in fallback order
    template_dir: folder holding the variants' templates
    fn:           the user-facing function (validates, picks a config, launches)
    reference:    PyTorch reference with the same signature as ``fn`` (tests use it)
    configs:      ``configs(arch) -> iterable of Config``: everything the runtime can select on
                  that arch, in order of preference per signature. Prebuild compiles this list.
    plan:         ``plan(call) -> Candidate | [Candidate, ...] | None``: what one call signature
                  runs (``jitkern.dispatch.Call``: ``call.args``, ``call.arch``, ``call.tiles()``).
                  Runs once per signature; validates the arguments; None launches nothing.
    tunables:     parameter -> the values it may take; ``JITKERN_<OP>_<PARAM>`` overrides and
                  ``call.tiles()`` are checked against them.
    scalars:      parameter -> ``Scalar``: arguments checked per call, not part of the signature.
    debug_checks: ``debug_checks(call) -> None``: checks of table *contents* (indices in range,
                  offsets consistent with sizes), the caller's contract on the hot path. The
                  dispatcher runs it on every call before the launch only under
                  ``JITKERN_DEBUG=checks`` (or ``redzone``); it reads the tables on the host and
                  raises ``TableError`` (helpers: ``jitkern.table_checks``). Off: never called.

    How the op is registered with ``torch.library`` (``jitkern.torch_ops``), so that
    ``torch.compile(fullgraph=True)`` traces it without a graph break. ``fn``'s parameters must carry
    type annotations (``torch.Tensor``, ``Optional[torch.Tensor]``, ``float``, ``int``, ``bool``...):
    the custom op's schema is inferred from them.

    mutates:      parameters ``fn`` writes in place: in-place inputs (a residual, ``qkv``) and
                  ``out=`` buffers. Everything else must be left untouched.
    outputs:      parameters whose final values ``fn`` returns (one name: that tensor; several: a
                  tuple), e.g. ``("out",)`` for an op with ``out=None`` that returns ``out``, or
                  ``("qkv",)`` for an op that updates ``qkv`` in place and returns it. They are
                  added to ``mutates``. Empty when ``fn`` returns new tensors (declare ``fake``) or
                  returns None (annotate ``-> None``).
    alloc:        ``alloc(**arguments) -> {name: tensor}``: the buffers for ``outputs`` that were
                  passed as None, allocated with ``torch.empty*`` from the other arguments (it must
                  work on fake tensors; it is what ``fn`` would allocate).
    fake:         only for ops that return new tensors and declare no ``outputs``: a function with
                  ``fn``'s signature returning empty tensors of the outputs' shapes and dtypes.
    """

    name: str
    variants: tuple[Variant, ...]
    template_dir: Path
    fn: Callable
    reference: Callable
    configs: Callable[[Any], Iterable[Config]]
    plan: Callable | None = None
    tunables: Mapping[str, tuple] = field(default_factory=dict)
    scalars: Mapping[str, Scalar] = field(default_factory=dict)
    doc: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    mutates: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    alloc: Callable | None = None
    fake: Callable | None = None
    debug_checks: Callable | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise SpecError(f"op name {self.name!r} must be a Python identifier")
        if not self.variants:
            raise SpecError(f"op {self.name!r} declares no variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise SpecError(f"op {self.name!r} has duplicate variant names: {names}")
        object.__setattr__(self, "template_dir", Path(self.template_dir))
        for field_name in ("mutates", "outputs"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                raise SpecError(f"op {self.name!r}: {field_name} must be a tuple of parameter names, got the "
                                f"string {value!r}; write ({value!r},)")
            object.__setattr__(self, field_name, tuple(value))
        object.__setattr__(self, "mutates", tuple(dict.fromkeys(self.mutates + self.outputs)))
        if self.outputs and self.fake is not None:
            raise SpecError(f"op {self.name!r} declares both outputs {self.outputs} and fake: an op either "
                            f"writes into its outputs (declare outputs and alloc) or returns new tensors "
                            f"(declare fake)")

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise SpecError(
            f"op {self.name!r} has no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}"
        )
