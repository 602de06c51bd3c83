"""The ``jitkern`` logger and log-once helpers."""
from __future__ import annotations

import logging
import threading

from . import state

log = logging.getLogger("jitkern")

_seen: set = set()
_lock = threading.Lock()


def warn_once(key, msg: str, *args) -> bool:
    """Log ``msg`` at WARNING the first time ``key`` is seen in this process."""
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    log.warning(msg, *args)
    return True


@state.on_reset
def forget() -> None:
    """Forget which warnings were logged (they are logged again once)."""
    with _lock:
        _seen.clear()


def quiet_third_party_warnings() -> None:
    """Warnings a CLI user cannot act on (torch's "Failed to initialize NumPy" where numpy is absent
    or mismatched) stay out of the output; prebuild's workers call this too."""
    import warnings

    warnings.filterwarnings("ignore", message=r"Failed to initialize NumPy", category=UserWarning)
