"""The example decoder (examples/jitkern_decoder) end to end: prefill + decode steps of a model made of
jitkern ops against an independent PyTorch reference with the same weights, logits compared at every
step; on the CPU a tiny config through Triton's interpreter, on a GPU Qwen3-8B shapes (eager and
under a CUDA graph). A fresh process over a layer the model filled compiles and renders nothing.

Tolerances (relative L2 error of a step's logits against the fp32 reference, ``rel_err``): bf16
weights and activations put PyTorch's own bf16 run of the reference at ~0.9% (tiny) from fp32; the
jitkern model must stay within TOL and within ERR_FACTOR times PyTorch-bf16's error (+ a floor). A
wrong rotary pairing gives 25-40%, a KV cache written one slot off ~10%.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from conftest import requires_gpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from jitkern_decoder import (TINY, JitkernDecoder, ReferenceDecoder, compare, make_weights,  # noqa: E402
                             qwen3_8b_shapes, rel_err)

TOL = 3e-2
ERR_FACTOR = 2.5
ERR_FLOOR = 5e-3


def _check_steps(recs, steps):
    assert len(recs) == steps + 1
    for r in recs:
        err, bf16 = r["err"]["fp32"], r["err"]["bf16"]
        assert err <= TOL, r
        assert err <= ERR_FACTOR * bf16 + ERR_FLOOR, r
        assert r["argmax_agree"]["fp32"] >= 0.5, r


def _run(cfg, batch, prompt_len, steps, device, seed=0, decode_fn=None):
    w = make_weights(cfg, device=device, seed=seed)
    model = JitkernDecoder(cfg, w, batch, record_routes=True)
    refs = {"fp32": ReferenceDecoder(cfg, w, batch, torch.float32),
            "bf16": ReferenceDecoder(cfg, w, batch, torch.bfloat16)}
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, cfg.vocab, (batch, prompt_len), generator=g).to(device)
    decode = decode_fn(model) if decode_fn else None
    return compare(model, refs, prompt, steps, decode=decode), model


def test_tiny_model_matches_reference_at_every_step():
    # 30 prompt tokens + 4 steps: decode attention crosses the interpreter's 32-token partition
    recs, model = _run(TINY, batch=2, prompt_len=30, steps=4, device="cpu")
    _check_steps(recs, 4)
    # both MoE routes were recorded, and prefill routing spread over more than one expert
    assert set(model.routes) == {i for i in range(TINY.layers) if TINY.is_moe(i)}
    assert len(torch.unique(model.routes[1][:60])) > 1


CHILD = textwrap.dedent("""
    import json, sys
    import torch, jitkern
    from jitkern_decoder import TINY, JitkernDecoder, make_weights
    w = make_weights(TINY)
    m = JitkernDecoder(TINY, w, 1)
    logits = m.prefill(torch.arange(5)[None])
    logits = m.decode(logits.float().argmax(-1), torch.tensor([5]))
    print(json.dumps({"stats": jitkern.stats(), "jinja2": "jinja2" in sys.modules,
                      "checksum": float(logits.float().sum())}))
""")


def _child(cache_dir):
    env = {**os.environ, "JITKERN_CACHE_DIR": cache_dir, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "examples")])}
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_fresh_process_over_prebuilt_layer_compiles_and_renders_nothing(tmp_path):
    layer, user = tmp_path / "prebuilt", tmp_path / "user"
    first = _child(str(layer))
    assert first["stats"]["compiles"] > 0 and first["jinja2"]
    before = _tree(layer)
    second = _child(os.pathsep.join([str(user), str(layer)]))
    assert second["stats"]["compiles"] == 0, second
    assert second["checksum"] == first["checksum"]
    assert _tree(layer) == before  # the prebuilt layer was only read
    assert not list(user.rglob("entries/*/*")), "the user layer got entries"
    assert not second["jinja2"] and second["stats"]["renders"] == 0, second  # every plan came from the index


# ---- GPU: full-size shapes ---------------------------------------------------------------------
def _graphed(model):
    """A decode step captured once in a CUDA graph (static token/position inputs), then replayed."""
    state = {}

    def step(tok, pos):
        if not state:
            st, sp = tok.clone(), pos.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up off the capture: compiles/loads every kernel first
                model.decode(st, sp)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = model.decode(st, sp)
            state.update(g=g, tok=st, pos=sp, out=out, first=True)
        state["tok"].copy_(tok)
        state["pos"].copy_(pos)
        state["g"].replay()
        return state["out"]

    return step


@requires_gpu
def test_full_size_model_matches_reference_on_gpu_with_cuda_graph():
    """Qwen3-8B shapes, 4 layers (2 dense, 2 MoE), batch 4, 100-token prompts, eager prefill, then
    6 decode steps replayed from one CUDA graph (its capture follows one eager decode step)."""
    cfg = qwen3_8b_shapes(layers=4, max_seq_len=128)
    recs, _ = _run(cfg, batch=4, prompt_len=100, steps=6, device="cuda", decode_fn=_graphed)
    print(json.dumps(recs))
    _check_steps(recs, 6)
