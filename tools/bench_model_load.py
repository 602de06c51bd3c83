"""Model load end to end (issue 16): time to the first token's logits in fresh processes, and decode steps.

    PYTHONPATH=$PWD python tools/bench_model_load.py [--layers 4] [--runs 3] [--batches 1,32,128]
                                                     [--out DIR] [--budget-s 330]

The model is examples/jitkern_decoder at Qwen3-8B shapes cut to ``--layers`` layers (every second
one MoE-shaped), bf16, random weights, prompt ``--prompt`` tokens x ``--ttft-batch`` sequences.

1. **Time to first token** (each figure the median of ``--runs`` fresh processes): the parent takes
   the wall clock just before it starts a child; the child reports when ``import torch`` finished,
   when CUDA was ready (``torch.cuda.init()`` + a first allocation + synchronize), when the model
   code was imported (jitkern, the example package) and the weights were made on the GPU, and when the
   prefill's logits were on the host (first forward). It then runs the same prefill again: the
   **jitkern time** is first forward minus second forward (compiles, cache lookups, loads, first
   launches; also torch's own first-use costs of the kernels the forward calls). **inside jitkern
   ops** is the time spent inside ``jitkern.ops`` calls in the first forward minus the second: the
   ops launch asynchronously, so this is jitkern's own share, without torch's first-use costs. Cases:

   (a) cold: empty jitkern cache and empty Triton cache (every kernel is compiled);
   (b) warm: the jitkern cache a cold run filled (and the Triton cache holding Triton's C launcher
       stubs that run built);
   (c) prebuilt read-only layer with ``JITKERN_STRICT=1``: ``JITKERN_CACHE_DIR=<empty user
       layer>:<layer>``; the layer is made with ``jitkern prebuild --manifest`` from a
       ``JITKERN_RECORD`` manifest of a warm run where this jitkern has them, else it is a copy of
       the warm cache (``layer_source`` in the JSON says which); made read-only (``chmod -R a-w``) and
       checked unchanged after the runs;
   (d) Triton JIT: the same rendered kernel sources imported as modules and launched through
       ``triton.jit`` with Triton's warm cache (jitkern only looks the source up in its cache);
       C++ variants (qk_norm_rope_cache's CUDA kernel) still load through jitkern;
   (e) PyTorch eager: the reference model in bf16 (cuBLAS, SDPA; no jitkern);
   (f) ``--background``, serve while compiling: the warm cache without the CUDA entries of
       ``CUDA_VARIANT_OP`` (its Triton variant cached instead), the preferred CUDA variant built before
       the first token (foreground) or by a background worker while the Triton one serves
       (``JITKERN_BACKGROUND_BUILD=1``; the child waits for the switch and records the logits after it).

2. **Decode step** (one process per batch size; prompt ``--prompt`` tokens, median of 3 timings of
   ``--iters`` steps each, CUDA events): jitkern eager, jitkern under a CUDA graph, jitkern under
   ``torch.compile(mode="reduce-overhead")``, and the reference model in bf16 eager and under
   ``torch.compile(mode="reduce-overhead")``, each at batch 1, 32, 128.

Results: one JSON (``--out``, default tools/results/) named with date and device, rewritten after
every figure, so a run cut short keeps what it measured; a table on stdout at the end. ``--budget-s``:
parts that would not fit in the remaining time are skipped and listed as skipped.

``--device cpu`` (with ``--tiny``): a smoke run of the whole orchestration on Triton's interpreter
(no CUDA graphs / torch.compile), for CI-less checking of this script.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLES = REPO / "examples"


# ---------------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------------
def _cfg(args):
    sys.path.insert(0, str(EXAMPLES))
    from jitkern_decoder import TINY, qwen3_8b_shapes

    if args.tiny:
        return TINY.with_(max_seq_len=args.prompt + 64)
    return qwen3_8b_shapes(layers=args.layers, max_seq_len=args.prompt + 64)


def _sync(dev):
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def _install_triton_jit_loader() -> list:
    """Case (d): Triton variants' kernels are launched through ``triton.jit`` on the rendered source in
    jitkern's entry (Triton's JIT specialises, looks up its own cache, loads and launches). jitkern still
    plans the call and finds the entry (its own cost stays in (d)); only loading and launching are
    Triton's. Returns ``[kernels made]``: a (d) run that made none did not measure Triton's JIT."""
    from jitkern.builders import base
    from jitkern.builders import triton as triton_builder

    made = [0]

    class TritonJITKernel(base.Kernel):
        def __init__(self, entry, job):
            super().__init__(entry, job)
            module = triton_builder.import_source(entry.file(triton_builder.SOURCE_FILE),
                                                  f"bench_jit.k{entry.key[:16]}")
            self._fn = triton_builder.kernel_function(module, job.variant.kernel, entry.path)
            self._options = job.config.compile_options()
            made[0] += 1

        def launch(self, grid3, *args):
            self._fn[grid3](*args, **self._options)

    import torch
    import triton

    # kernels that make TMA descriptors on the device need global scratch: Triton's JIT asks this allocator
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    gpu_load = triton_builder.load_gpu  # where GPU entries become kernels (the driver path and the fast
    # C launch path hang off it: a TritonJITKernel has neither, so every launch goes through its JIT)
    triton_builder.load_gpu = lambda entry, job: (TritonJITKernel(entry, job) if job.arch.backend == "cuda"
                                                  else gpu_load(entry, job))
    return made


def _accumulating(fn, acc: list):
    """``fn`` that adds the seconds spent inside it to ``acc[0]`` and counts its calls in ``acc[1]``."""
    def call(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[0] += time.perf_counter() - t
            acc[1] += 1
    return call


def _time_kernel_acquisition() -> list:
    """Wrap ``jitkern.runtime.kernel`` (every path that needs a kernel goes through it): returns
    ``[seconds inside it, calls]``, updated as the process runs."""
    from jitkern import runtime

    acc = [0.0, 0]
    runtime.kernel = _accumulating(runtime.kernel, acc)
    return acc


def _time_op_calls() -> list:
    """Wrap every ``jitkern.ops.<name>`` the model calls: returns ``[seconds inside them, calls]``,
    updated as the process runs. The ops launch asynchronously, so this is CPU time of jitkern's own
    (plan, cache lookup, load, signature, launch) with none of torch's first-use costs of the model's
    torch ops (those land between the calls) and no GPU time (until a call waits, which none does)."""
    import jitkern
    from jitkern import ops

    acc = [0.0, 0]
    for name in jitkern.registry.names():
        setattr(ops, name, _accumulating(getattr(ops, name), acc))
    return acc


def child_ttft(args) -> dict:
    t0 = float(os.environ["BENCH_T0"])
    t_up = time.time()
    import torch

    t_torch = time.time()
    dev = args.device
    if dev == "cuda":
        torch.cuda.init()
        torch.empty(1, device=dev)
        torch.cuda.synchronize()
    t_cuda = time.time()
    cfg = _cfg(args)
    from jitkern_decoder import JitkernDecoder, ReferenceDecoder, make_weights

    jit_made = _install_triton_jit_loader() if args.impl == "triton-jit" else None
    acquire = _time_kernel_acquisition() if args.impl != "eager" else None
    in_ops = _time_op_calls() if args.impl != "eager" else None
    t_import = time.time()
    w = make_weights(cfg, device=dev, seed=0)
    if args.impl == "eager":
        model = ReferenceDecoder(cfg, w, args.ttft_batch, torch.bfloat16)
    else:
        model = JitkernDecoder(cfg, w, args.ttft_batch)
    prompt = torch.randint(0, cfg.vocab, (args.ttft_batch, args.prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(dev)
    if args.prewarm_torch:  # torch's own first-use costs (cuBLAS, SDPA, softmax, topk...) paid before the clock
        ReferenceDecoder(cfg, w, args.ttft_batch, torch.bfloat16).prefill(prompt).float().cpu()
    _sync(dev)
    t_weights = time.time()
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        logits = prof.runcall(lambda: model.prefill(prompt).float().cpu())
        text = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=text).sort_stats(key).print_stats(45)
        Path(args.profile).write_text(text.getvalue())
    else:
        logits = model.prefill(prompt).float().cpu()
    t_first = time.time()
    ops_first = in_ops[0] if in_ops else 0.0
    logits2 = model.prefill(prompt).float().cpu()
    t_second = time.time()
    ops_second = in_ops[0] - ops_first if in_ops else 0.0
    if os.environ.get("JITKERN_BACKGROUND_BUILD") == "1":
        from jitkern import background  # noqa: F401 (ImportError: this jitkern has no background builds)

        background.wait(timeout=300)  # a switch to the preferred variant, and the logits it gives
        for _ in range(3):
            logits3 = model.prefill(prompt).float().cpu()
    else:
        logits3 = logits2
    out = {
        "impl": args.impl,
        "prewarm_torch": args.prewarm_torch,
        "python_start_s": t_up - t0,
        "import_torch_s": t_torch - t_up,
        "cuda_init_s": t_cuda - t_torch,
        "import_model_s": t_import - t_cuda,
        "weights_s": t_weights - t_import,
        "first_forward_s": t_first - t_weights,
        "second_forward_s": t_second - t_first,
        "ttft_s": t_first - t0,
        "from_cuda_ready_s": t_first - t_cuda,
        "checksum": float(logits.sum()),
        "repeat_identical": bool(torch.equal(logits, logits2)),
        "after_switch_rel_diff": float((logits3 - logits).norm() / logits.norm()),
        "argmax": logits.argmax(-1).tolist()[:8],
    }
    out["jitkern_s"] = out["first_forward_s"] - out["second_forward_s"]
    if in_ops is not None:  # inside jitkern.ops calls: first forward, second, and what the first adds
        out["in_ops_first_s"], out["in_ops_second_s"] = ops_first, ops_second
        out["jitkern_own_s"] = ops_first - ops_second
    if jit_made is not None:
        out["triton_jit_kernels"] = jit_made[0]
    out["triton_imported"] = "triton" in sys.modules
    if acquire is not None:  # inside jitkern.runtime.kernel: plan, cache lookup (or build), load
        out["kernel_acquire_s"], out["kernel_acquires"] = acquire[0], acquire[1]
    if "jitkern" in sys.modules:
        import jitkern

        out["stats"] = {k: v for k, v in jitkern.stats().items() if v}
    return out


def _timed(fn, dev, iters, reps=3) -> float:
    """Median over ``reps`` of the mean step time (ms) of ``iters`` back-to-back calls."""
    import torch

    times = []
    for _ in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / iters)
    return statistics.median(times)


def _emit(rec: dict) -> None:
    print("BENCH " + json.dumps(rec), flush=True)


def decode_setup(cfg, w, batch: int, prompt_len: int, dev: str):
    """``(jitkern model, reference model, tokens, positions, reference logits)`` of one decode step at
    position ``prompt_len`` after a seeded random prompt's prefill in both models."""
    import torch
    from jitkern_decoder import JitkernDecoder, ReferenceDecoder

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab, (batch, prompt_len), generator=g).to(dev)
    tok = torch.randint(0, cfg.vocab, (batch,), generator=g).to(dev)
    pos = torch.full((batch,), prompt_len, dtype=torch.int64, device=dev)
    model = JitkernDecoder(cfg, w, batch)
    ref = ReferenceDecoder(cfg, w, batch, torch.bfloat16)
    model.prefill(prompt)
    ref.prefill(prompt)
    want = ref.decode(tok, pos).float()
    _sync(dev)
    return model, ref, tok, pos, want


def child_decode(args) -> None:
    """Decode-step figures for every batch size in ``--batches`` (one process: torch.compile's second
    batch size compiles a dynamic-shape graph that the third reuses), one JSON line per figure as soon
    as it is measured; a failing figure is reported and the others still run."""
    import torch

    dev = args.device
    cfg = _cfg(args)
    from jitkern_decoder import make_weights, rel_err

    w = make_weights(cfg, device=dev, seed=0)
    for b in args.batches:
        model, ref, tok, pos, want = decode_setup(cfg, w, b, args.prompt, dev)

        def figure(name, make, warm=3):
            t = time.perf_counter()
            try:
                fn = make()
                for _ in range(warm):
                    got = fn()
                _sync(dev)
                setup = time.perf_counter() - t
                ms = _timed(fn, dev, args.iters)
            except Exception as e:  # report it; the other figures still run
                _emit({"batch": b, "impl": name, "error": f"{type(e).__name__}: {e}"[:2000]})
                return
            _emit({"batch": b, "impl": name, "step_ms": ms, "setup_s": setup,
                   "rel_err_vs_ref_eager": rel_err(got, want)})

        figure("jitkern_eager", lambda: lambda: model.decode(tok, pos))
        figure("reference_eager", lambda: lambda: ref.decode(tok, pos))
        if dev == "cuda":
            figure("jitkern_cuda_graph", lambda: _graph(model, tok, pos))
            figure("jitkern_torch_compile", lambda: functools.partial(
                torch.compile(model.decode, mode="reduce-overhead"), tok, pos))
            figure("reference_torch_compile", lambda: functools.partial(
                torch.compile(ref.decode, mode="reduce-overhead"), tok, pos))
        del model, ref
        if dev == "cuda":
            torch.cuda.empty_cache()


def _graph(model, tok, pos):
    """``replay()`` of one decode step captured in a CUDA graph (after one eager step off the capture)."""
    import torch

    st, sp = tok.clone(), pos.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model.decode(st, sp)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model.decode(st, sp)

    def replay():
        graph.replay()
        return out
    # the graph reads st and sp where they were at capture: keep them alive (freed, their memory goes to
    # the next allocations, and replays read whatever those write: a device-side index assert, or noise)
    replay.static_inputs = (st, sp)
    return replay


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.time()
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-model-load-"))
        import torch
        import triton

        dev = args.device
        name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
        self.res = {
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "device": name, "torch": torch.__version__, "triton": triton.__version__,
            "python": sys.version.split()[0], "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "commit": os.environ.get("BENCH_COMMIT") or _git_head(),
            "model": None, "ttft": {}, "decode": {}, "skipped": [], "errors": [], "notes": [],
        }
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        out_dir = Path(args.out) if args.out else REPO / "tools" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"model_load_{slug}_{time.strftime('%Y-%m-%d', time.gmtime())}.json"

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t_start)

    def save(self):
        self.path.write_text(json.dumps(self.res, indent=1, sort_keys=False))

    def env(self, jitkern_cache, triton_cache, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JITKERN_")}
        env.pop("TRITON_INTERPRET", None)
        if self.args.device == "cpu":
            env["TRITON_INTERPRET"] = "1"
        env.update(JITKERN_CACHE_DIR=str(jitkern_cache), TRITON_CACHE_DIR=str(triton_cache), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(EXAMPLES), os.environ.get("PYTHONPATH"))
                                              if p))
        env.update(bytecode_env(self.tmp))
        env.update(extra)
        return env

    def common_argv(self) -> list[str]:
        a = self.args
        argv = ["--device", a.device, "--layers", str(a.layers), "--prompt", str(a.prompt),
                "--ttft-batch", str(a.ttft_batch), "--iters", str(a.iters)]
        return argv + (["--tiny"] if a.tiny else [])

    def ttft(self, case: str, impl: str, env: dict, need_s: float, keep: bool = True, extra_argv=()):
        if self.left() < need_s:
            self.res["skipped"].append(f"ttft {case}: {self.left():.0f} s left, needs ~{need_s:.0f} s")
            self.save()
            return None
        argv = [sys.executable, __file__, "--child", "ttft", "--impl", impl, *self.common_argv(), *extra_argv]
        if case.endswith(PREWARMED):
            argv.append("--prewarm-torch")
        env = {**env, "BENCH_T0": repr(time.time())}
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=max(30, self.left()))
        if p.returncode != 0:
            self.res["errors"].append({"case": case, "rc": p.returncode, "stderr": p.stderr[-3000:]})
            print(f"  {case}: FAILED rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
            self.save()
            return None
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if keep:
            self.res["ttft"].setdefault(case, {"runs": []})["runs"].append(r)
            self.summarize(case)
        print(f"  {case}: ttft {r['ttft_s']:.3f} s (torch {r['import_torch_s']:.2f}, cuda {r['cuda_init_s']:.2f}, "
              f"model code {r['import_model_s']:.3f}, weights {r['weights_s']:.3f}, first fwd "
              f"{r['first_forward_s']:.3f}, second {r['second_forward_s']:.3f}; triton imported: {r['triton_imported']}"
              + (f", {r['triton_jit_kernels']} kernels through Triton's JIT" if "triton_jit_kernels" in r else "")
              + f") {r.get('stats', '')}", flush=True)
        self.save()
        return r

    def summarize(self, case):
        runs = self.res["ttft"][case]["runs"]
        keys = [k for k, v in runs[0].items() if isinstance(v, float) and k != "checksum"]
        self.res["ttft"][case]["median"] = {k: statistics.median(r[k] for r in runs) for k in keys}
        self.res["ttft"][case]["n"] = len(runs)
        self.res["ttft"][case]["checksums"] = sorted({r["checksum"] for r in runs})

    def decode(self, env: dict):
        a = self.args
        need = 25 if a.device == "cpu" else 90
        if not a.batches:
            return
        if self.left() < need:
            self.res["skipped"].append(f"decode: {self.left():.0f} s left, needs ~{need} s")
            self.save()
            return
        argv = [sys.executable, __file__, "--child", "decode", "--batches", ",".join(map(str, a.batches)),
                *self.common_argv()]
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err_lines: list[str] = []
        drain = threading.Thread(target=lambda: err_lines.extend(p.stderr), daemon=True)
        drain.start()
        timer = threading.Timer(max(10.0, self.left()), p.kill)
        timer.start()
        try:
            for line in p.stdout:
                if not line.startswith("BENCH "):
                    continue
                r = json.loads(line[6:])
                self.res["decode"].setdefault(str(r["batch"]), {})[r["impl"]] = r
                if "error" in r:
                    print(f"  decode b={r['batch']} {r['impl']}: ERROR {r['error'][:500]}", flush=True)
                else:
                    print(f"  decode b={r['batch']} {r['impl']}: {r['step_ms']:.3f} ms/step (setup {r['setup_s']:.1f} s, "
                          f"rel err vs reference eager {r['rel_err_vs_ref_eager']:.4f})", flush=True)
                self.save()
        finally:
            p.wait()
            timer.cancel()
            drain.join(timeout=5)
        if p.returncode != 0:
            self.res["errors"].append({"case": "decode", "rc": p.returncode, "stderr": "".join(err_lines)[-3000:]})
            print(f"  decode: rc={p.returncode}\n{''.join(err_lines)[-3000:]}", flush=True)
        self.save()

    def make_layer(self, warm_cache: Path, triton_cache: Path) -> Path:
        """Case (c)'s read-only layer: from a JITKERN_RECORD manifest when this jitkern records them."""
        layer = self.tmp / "prebuilt-layer"
        manifest = self.tmp / "manifest.json"
        source = None
        why = "this jitkern has no 'prebuild --manifest'"
        if _cli_has("prebuild", "--manifest"):
            r = self.ttft("record", "jitkern", self.env(warm_cache, triton_cache, JITKERN_RECORD=str(manifest)), 15,
                          keep=False)
            why = "the recording run wrote no manifest"
            if r is not None and manifest.exists():
                arch = "cpu" if self.args.device == "cpu" else "sm_90"
                p = subprocess.run([sys.executable, "-m", "jitkern", "prebuild", "--manifest", str(manifest), "--arch",
                                    arch, "--cache-dir", str(layer)], env=self.env(layer, triton_cache),
                                   capture_output=True, text=True)
                if p.returncode == 0:
                    source = "jitkern prebuild --manifest (JITKERN_RECORD of a warm run)"
                    self.res["manifest_signatures"] = sum(1 for line in manifest.read_text().splitlines() if line)
                else:
                    why = f"prebuild --manifest failed (rc {p.returncode})"
                    self.res["errors"].append({"case": "prebuild", "rc": p.returncode, "stderr": p.stderr[-3000:]})
                    shutil.rmtree(layer, ignore_errors=True)
        if source is None:
            shutil.copytree(warm_cache, layer, symlinks=True)
            source = f"copy of the warm cache ({why})"
        subprocess.run(["chmod", "-R", "a-w", str(layer)], check=True)
        self.res["layer_source"] = source
        return layer

    def run(self):
        a = self.args
        sys.path.insert(0, str(EXAMPLES))
        cfg = _cfg(a)
        self.res["model"] = {**cfg.__dict__, "prompt": a.prompt, "ttft_batch": a.ttft_batch, "dtype": "bfloat16"}
        self.save()
        t = self.tmp
        warm, warm_tc = t / "jk-warm", t / "tc-warm"
        cold = [(t / f"jk-cold{i}", t / f"tc-cold{i}") for i in range(a.runs)]
        big = 60 if a.device == "cuda" else 30
        small = 15 if a.device == "cuda" else 12
        print("time to first token", flush=True)
        # every module the children import compiled to bytecode once, before any clock runs
        subprocess.run([sys.executable, "-c", WARM_BYTECODE], env=self.env(t / "jk-none", t / "tc-none"), check=True)
        self.res["notes"].append("Python bytecode: the children share one PYTHONPYCACHEPREFIX, filled before the "
                                 "first case, with PYTHONDONTWRITEBYTECODE unset (see bytecode_env)")
        # (a) run 0 fills the warm cache (its own dirs, then copied), so the cold runs are all real
        first = self.ttft("a_cold", "jitkern", self.env(cold[0][0], cold[0][1]), big)
        if first is None:
            return
        for src, dst in ((cold[0][0], warm), (cold[0][1], warm_tc)):
            if src.exists():
                shutil.copytree(src, dst, symlinks=True)
            else:
                dst.mkdir()
        for _ in range(a.runs):
            self.ttft("b_warm", "jitkern", self.env(warm, warm_tc), small)
        for _ in range(a.runs):
            self.ttft("b_warm" + PREWARMED, "jitkern", self.env(warm, warm_tc), small)
        if a.profile_warm:  # one more warm run (not counted) under cProfile: where jitkern's time goes
            for case in ("b_warm_profiled", "b_warm_profiled" + PREWARMED):  # torch's first use in, then out
                self.ttft(case, "jitkern", self.env(warm, warm_tc), small, keep=False,
                          extra_argv=["--profile", str(self.path.with_name(f"{self.path.stem}_{case}.txt"))])
        for _ in range(a.runs):
            self.ttft("e_pytorch_eager", "eager", self.env(t / "jk-none", t / "tc-none"), small)
        jit_tc = t / "tc-jit"
        self.ttft("d_triton_jit_warmup", "triton-jit", self.env(warm, jit_tc), big, keep=False)
        for _ in range(a.runs):
            self.ttft("d_triton_jit_warm", "triton-jit", self.env(warm, jit_tc), small)
        layer = self.make_layer(warm, warm_tc)
        before = _tree(layer)
        for i in range(a.runs):
            n_err = len(self.res["errors"])
            r = self.ttft("c_prebuilt_strict", "jitkern",
                          self.env(os.pathsep.join([str(t / f"jk-user{i}"), str(layer)]), warm_tc, JITKERN_STRICT="1"),
                          small)
            if r is not None:
                self.ttft("c_prebuilt_strict" + PREWARMED, "jitkern",
                          self.env(os.pathsep.join([str(t / f"jk-user{i}p"), str(layer)]), warm_tc, JITKERN_STRICT="1"),
                          small)
            failed = r is None and len(self.res["errors"]) > n_err
            if failed and i == 0 and self.res["layer_source"].startswith("jitkern prebuild"):
                self.res["notes"].append("the manifest-built layer failed under strict mode (see errors); (c) "
                                         "measured on a read-only copy of the warm cache instead")
                subprocess.run(["chmod", "-R", "u+w", str(layer)])
                shutil.rmtree(layer)
                shutil.copytree(warm, layer, symlinks=True)
                subprocess.run(["chmod", "-R", "a-w", str(layer)], check=True)
                self.res["layer_source"] = "copy of the warm cache (the manifest-built layer failed)"
                before = _tree(layer)
        self.res["layer_unchanged"] = _tree(layer) == before
        self.floors_ttft()
        print("decode steps", flush=True)
        self.decode(self.env(warm, warm_tc))
        self.floors_decode()
        print("time to first token, more cold runs", flush=True)
        for i in range(1, a.runs):
            self.ttft("a_cold", "jitkern", self.env(cold[i][0], cold[i][1]), big)
        if a.background:
            # a layer built where no nvcc was: the Triton variant of the op with a CUDA one is cached, the
            # preferred CUDA one is not. A warm run caches only what it ran (the CUDA variant): its CUDA entries
            # are dropped, one run with nvcc pointed nowhere fills in the Triton one (and records the CUDA
            # build's failure, under a key that names the missing nvcc), and the CUDA entries are dropped again.
            partial = t / "jk-partial"
            shutil.copytree(warm, partial, symlinks=True)
            dropped = _drop_entries(partial, CUDA_VARIANT_OP, "cuda")
            self.ttft("f_fill_triton_variant", "jitkern",
                      self.env(partial, warm_tc, JITKERN_NVCC=str(t / "no-nvcc-here")), 25, keep=False)
            _drop_entries(partial, CUDA_VARIANT_OP, "cuda")
            self.res["background_dropped_entries"] = dropped
            if not dropped:  # the cases below would measure a warm cache twice
                self.res["errors"].append({"case": "background", "why": f"the warm cache holds no {CUDA_VARIANT_OP} "
                                           "CUDA entry to drop"})
            for i in range(a.runs):
                for case, bg in (("f_cuda_variant_missing_foreground", "0"), ("f_cuda_variant_missing_background", "1")):
                    d = t / f"jk-{case}-{i}"
                    shutil.copytree(partial, d, symlinks=True)
                    self.ttft(case, "jitkern", self.env(d, warm_tc, JITKERN_BACKGROUND_BUILD=bg), 25)
        self.floors_ttft()
        subprocess.run(["chmod", "-R", "u+w", str(t)])
        shutil.rmtree(t, ignore_errors=True)

    def floors_ttft(self):
        m = {k: v.get("median") for k, v in self.res["ttft"].items()}
        f = self.res.setdefault("floors", {})
        for case in ("b_warm", "c_prebuilt_strict", "b_warm" + PREWARMED, "c_prebuilt_strict" + PREWARMED):
            if m.get(case):
                f[f"{case}_jitkern_s"] = m[case]["jitkern_s"]
                f[f"{case}_jitkern_le_50ms"] = m[case]["jitkern_s"] <= 0.050
                if "jitkern_own_s" in m[case]:
                    f[f"{case}_inside_jitkern_ops_s"] = m[case]["jitkern_own_s"]
                    f[f"{case}_inside_jitkern_ops_le_50ms"] = m[case]["jitkern_own_s"] <= 0.050
        if m.get("b_warm") and m.get("d_triton_jit_warm"):
            r = m["b_warm"]["from_cuda_ready_s"] / m["d_triton_jit_warm"]["from_cuda_ready_s"]
            f["b_over_d_from_cuda_ready"] = r
            f["b_over_d_le_0.5"] = r <= 0.5
            # a (d) whose kernels were not made by Triton's JIT measured jitkern twice
            f["d_kernels_through_triton_jit"] = min(x.get("triton_jit_kernels", 0)
                                                    for x in self.res["ttft"]["d_triton_jit_warm"]["runs"])
            f["b_over_d_first_forward"] = m["b_warm"]["first_forward_s"] / m["d_triton_jit_warm"]["first_forward_s"]
        if m.get("b_warm" + PREWARMED) and m.get("e_pytorch_eager"):  # torch's share of case (b)'s jitkern time
            f["torch_first_use_s"] = m["b_warm"]["jitkern_s"] - m["b_warm" + PREWARMED]["jitkern_s"]
        self.save()

    def floors_decode(self):
        f = self.res.setdefault("floors", {})
        for b, d in self.res["decode"].items():
            if "step_ms" in d.get("jitkern_cuda_graph", {}) and "step_ms" in d.get("reference_torch_compile", {}):
                r = d["jitkern_cuda_graph"]["step_ms"] / d["reference_torch_compile"]["step_ms"]
                f[f"decode_b{b}_graph_over_compiled_ref"] = r
                f[f"decode_b{b}_graph_le_1.0x"] = r <= 1.0
        self.save()


#: Imports every module a child's forward needs (torch's, Triton's, jitkern's, the model's), so they are
#: compiled to bytecode before the first timed case.
WARM_BYTECODE = ("import importlib, torch, triton, triton.language, triton.compiler, jitkern, jitkern_decoder\n"
                 "import jitkern.build, jitkern.load, jitkern.launcher, jitkern.torch_ops, jitkern.builders.cpp\n"
                 "for m in jitkern.registry.BUILTIN.values(): importlib.import_module(m)\n")


def bytecode_env(tmp: Path) -> dict:
    """Environment for children: Python bytecode kept as a deployed install keeps it. pip compiles
    ``.pyc`` files at install time, but a machine that sets PYTHONDONTWRITEBYTECODE, or whose
    site-packages have no ``.pyc`` and cannot be written, compiles every module from source in every
    process: in a warm first forward on the H200 machine (2026-12-01, cProfile) 127 ms went to
    ``compile`` of Triton's and jitkern's modules. All children share one PYTHONPYCACHEPREFIX."""
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}


#: Cases whose child first runs the PyTorch reference model's prefill (same weights, same prompt) before
#: the clock starts, so torch's own first-use costs of the kernels both models call (SDPA, softmax,
#: topk, indexing; cuBLAS for the reference) are paid outside jitkern's time: ``jitkern_s`` of these is
#: jitkern's alone (cache lookups, loads, first launches, Triton's driver).
PREWARMED = "_torch_prewarmed"


def _git_head() -> str | None:
    """HEAD, with ``+changes`` when tracked files differ from it (a copied tree whose git metadata is
    older than its files: the commit alone would name code that did not run)."""
    p = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    head = p.stdout.strip()
    if not head:
        return None
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


#: The model's op whose preferred variant on sm_90 is CUDA C++ (nvcc) with a Triton one after it: the
#: background-build cases run without its CUDA entries.
CUDA_VARIANT_OP = "qk_norm_rope_cache"


def _drop_entries(root: Path, op: str, variant: str) -> int:
    """Remove the cache entries of ``op``/``variant`` under a cache directory; returns how many."""
    n = 0
    for meta in root.glob("v*/entries/*/*/entry.json"):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if m.get("op") == op and m.get("variant") == variant:
            shutil.rmtree(meta.parent)
            n += 1
    return n


def _cli_has(command: str, flag: str) -> bool:
    p = subprocess.run([sys.executable, "-m", "jitkern", command, "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return p.returncode == 0 and flag in p.stdout


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def table(res: dict) -> str:
    lines = [f"{res['device']}, torch {res['torch']}, Triton {res['triton']}, {res['date_utc']} UTC", "",
             "| case | runs | first token (s) | import torch | CUDA init | model code | weights | first fwd | "
             "2nd fwd | jitkern time | inside jitkern ops | from CUDA ready |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, v in res["ttft"].items():
        m = v.get("median")
        if not m:
            continue
        lines.append(f"| {case} | {v['n']} | {m['ttft_s']:.3f} | {m['import_torch_s']:.3f} | {m['cuda_init_s']:.3f} | "
                     f"{m['import_model_s']:.3f} | {m['weights_s']:.3f} | {m['first_forward_s']:.3f} | "
                     f"{m['second_forward_s']:.3f} | {m['jitkern_s'] * 1e3:.1f} ms | "
                     f"{m.get('jitkern_own_s', 0) * 1e3:.1f} ms | {m['from_cuda_ready_s']:.3f} |")
    impls = ("jitkern_eager", "jitkern_cuda_graph", "jitkern_torch_compile", "reference_eager",
             "reference_torch_compile")
    lines += ["", "| batch | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for b, d in res["decode"].items():
        cells = [f"{d[i]['step_ms']:.3f} ms" if "step_ms" in d.get(i, {}) else ("error" if i in d else "-")
                 for i in impls]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "floors: " + json.dumps(res.get("floors", {})), "skipped: " + json.dumps(res["skipped"])]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=("ttft", "decode"))
    ap.add_argument("--impl", default="jitkern", choices=("jitkern", "triton-jit", "eager"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU-test config")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--ttft-batch", type=int, default=1)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 32, 128],
                    help="decode batch sizes ('': no decode cases)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--background", action="store_true", help="also (f): a warm cache without qk_norm_rope_cache's CUDA entries, with and without "
                         "JITKERN_BACKGROUND_BUILD=1 (serve while compiling)")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--prewarm-torch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-warm", action="store_true",
                    help="also two warm runs under cProfile (torch's first use in, then prewarmed), written "
                         "beside the JSON (*_b_warm_profiled*.txt)")
    ap.add_argument("--profile", default=None, help=argparse.SUPPRESS)  # a child: cProfile its first forward
    args = ap.parse_args(argv)
    if args.child == "ttft":
        print(json.dumps(child_ttft(args)))
        return 0
    if args.child == "decode":
        child_decode(args)
        return 0
    b = Bench(args)
    try:
        b.run()
    finally:
        b.save()
        print(table(b.res), flush=True)
        print(f"results: {b.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
