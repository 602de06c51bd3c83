"""Status names, spelled once.

An entry's ``entry.json`` ``"status"`` says what it holds; ``get_entry`` says how it got an entry;
prebuild's report says what became of each artifact.
"""
from __future__ import annotations

# ---- what an entry holds (entry.json "status") --------------------------------------------------
#: a launchable artifact within the arch's budget
OK = "ok"
#: an artifact over the arch's resource budget: recorded so no process compiles it again, never launched
REJECTED = "rejected_over_budget"
#: a recorded build failure (``jitkern.failures``): no artifact, the reason and the compiler log
FAILED = "failed"

# ---- how get_entry obtained an entry ---------------------------------------------------------------
CACHED = "cached"  # found in a local layer
FETCHED = "fetched"  # from the remote cache
BUILT = "built"  # compiled by this process

# ---- prebuild report only ----------------------------------------------------------------------------
UNAVAILABLE = "unavailable"  # the variant's toolchain is missing on this machine

REPORT_STATUSES = (BUILT, CACHED, REJECTED, UNAVAILABLE, FAILED)
