"""``jitkern.ops.<name>(...)``: every registered op, resolved on first attribute access.

Looking an op up imports its spec and checks what ``torch.library`` needs of it (``jitkern.torch_ops``
registers the custom op when a trace or ``torch.ops.jitkern.<name>`` first asks for it); nothing is
rendered, compiled or loaded until it is called. What you get is the op's function in
eager mode and ``torch.ops.jitkern.<name>`` while ``torch.compile`` traces.
"""
from __future__ import annotations

from . import registry
from .errors import UnknownOpError


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        spec = registry.get(name)
    except UnknownOpError as e:
        raise AttributeError(str(e)) from None
    from .torch_ops import op_function  # imports torch: on first op access, not at `import jitkern.ops`

    fn = op_function(spec)
    globals()[name] = fn
    return fn


def __dir__():
    return registry.names()
