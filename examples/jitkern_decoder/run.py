"""Prefill + N decode steps of the jitkern model against references, logits compared at every step."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements (fp32)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(model, refs: dict, prompt: torch.Tensor, steps: int, decode=None) -> list[dict]:
    """Run ``model`` and every reference in ``refs`` ({name: ReferenceDecoder}) on ``prompt`` [B, T]
    then ``steps`` decode steps. The token fed at each step is the argmax of the first reference's
    logits (teacher forcing: a near-tied argmax must not fork the sequences), and MoE layers of the
    references route as the model did (``model.record_routes`` must be on). ``decode``: the callable
    running the model's decode step (default ``model.decode``; e.g. a CUDA-graph replay).

    Returns one record per step: ``{"step", "err": {ref: rel_err(model, ref)}, "max_abs": {...},
    "argmax_agree": {...}}`` with ``err`` the relative L2 error of the model's logits."""
    decode = decode or model.decode
    b, t = prompt.shape
    first = next(iter(refs))

    def routes(n):
        return {i: r[:n].clone() for i, r in model.routes.items()}

    out = []

    def record(step, got, wants):
        rec = {"step": step, "err": {}, "max_abs": {}, "argmax_agree": {}}
        for name, want in wants.items():
            rec["err"][name] = rel_err(got, want)
            rec["max_abs"][name] = float((got.float() - want.float()).abs().max())
            rec["argmax_agree"][name] = float((got.float().argmax(-1) == want.float().argmax(-1)).float().mean())
        out.append(rec)

    got = model.prefill(prompt)
    r = routes(b * t)
    wants = {name: ref.prefill(prompt, forced_routes=r) for name, ref in refs.items()}
    record(0, got, wants)
    pos = torch.full((b,), t, dtype=torch.int64, device=prompt.device)
    for s in range(1, steps + 1):
        tok = wants[first].float().argmax(-1)
        got = decode(tok, pos)
        r = routes(b)
        wants = {name: ref.decode(tok, pos, forced_routes=r) for name, ref in refs.items()}
        record(s, got, wants)
        pos = pos + 1
    return out
