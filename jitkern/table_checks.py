"""Debug checks of table contents: ``JITKERN_DEBUG=checks`` (implied by ``redzone``).

Shapes, dtypes, strides and scalar ranges are validated for every call signature by the ops' plans
(``jitkern.checks``, cheap and always on). What is *in* an index table (block-table entries inside
the KV cache, ``cu_seq_lens`` consistent with ``num_tokens``, sorted pair ids below the padding
sentinel) is the caller's contract on the hot path: reading it would cost a device-to-host copy and a
sync on every call. A table that breaks it makes a kernel read or write outside its buffers (a
segfault on CPU, an illegal address or silent garbage on a GPU).

With the mode on, the dispatcher (``jitkern.dispatch``) runs the op's ``OpSpec.debug_checks(call)``
on every call, before anything is launched. The op's function copies the tables to the host with
the helpers below, which raise ``TableError`` naming the op, the argument, the first bad position,
its value and the allowed range. The mode is read when a call signature is decided, so with it off
the hot path is the same code as without this feature; after changing ``JITKERN_DEBUG`` in a running
process, call ``jitkern.reset()``. The checks synchronize with the device, so (like redzone mode)
they are for debugging runs, not for CUDA-graph capture.
"""
from __future__ import annotations

from . import settings
from .errors import TableError

#: The ``JITKERN_DEBUG`` switches that turn the checks on (redzone mode implies them).
SWITCHES = frozenset({"checks", "redzone"})


def enabled() -> bool:
    """Whether JITKERN_DEBUG lists ``checks`` or ``redzone``."""
    return not SWITCHES.isdisjoint(settings.get("debug"))


def host(t):
    """Tensor ``t`` as an int64 CPU tensor (a copy: a device sync on a GPU)."""
    import torch

    return t.detach().to(device="cpu", dtype=torch.int64)


def fail(op: str, argument: str, index: tuple, value, allowed: str) -> None:
    """Raise ``TableError``: ``argument[index]`` holds ``value``, where ``allowed`` (in words) is."""
    where = "".join(f"[{i}]" for i in index)
    raise TableError(f"{op}: {argument}{where} = {value}, expected {allowed}. Table contents are the caller's "
                     f"contract (not checked on the hot path); checked before the launch because JITKERN_DEBUG has checks (or redzone). "
                     f"Fix the table, or the code that builds it", op=op, argument=argument, index=tuple(index),
                     value=value, allowed=allowed)


def within(op: str, argument: str, values, lo: int, hi: int, *, inclusive: bool = False, used=None,
           what: str = "") -> None:
    """Every value of the host tensor ``values`` where ``used`` is true (default: all) lies in
    ``[lo, hi)`` (``inclusive``: ``[lo, hi]``); else ``TableError`` for the first bad one in
    row-major order. ``what`` says where the bound comes from."""
    bad = (values < lo) | ((values > hi) if inclusive else (values >= hi))
    if used is not None:
        bad &= used
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        span = f"[{lo}, {hi}]" if inclusive else f"[{lo}, {hi})"
        fail(op, argument, pos, int(values[pos]), f"a value in {span}" + (f" ({what})" if what else ""))


def nondecreasing(op: str, argument: str, values) -> None:
    """The 1-D host tensor ``values`` never decreases (prefix sums); else ``TableError``."""
    down = (values[1:] < values[:-1]).nonzero()
    if down.numel():
        i = int(down[0]) + 1
        fail(op, argument, (i,), int(values[i]), f"at least {argument}[{i - 1}] = {int(values[i - 1])} (offsets are "
                                                  f"prefix sums: non-decreasing)")


def used_blocks(lens, page_size: int, max_blocks: int):
    """``[batch, max_blocks]`` bool: the block-table entries that sequences of lengths ``lens`` (a 1-D
    host tensor) read, ``ceil(len / page_size)`` per row (none for a length <= 0)."""
    import torch

    need = (lens.clamp(min=0) + page_size - 1) // page_size
    return torch.arange(max_blocks)[None, :] < need[:, None]
