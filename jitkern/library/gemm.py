"""gemm: ``C = A @ B`` for bf16/fp16 matrices, fp32 accumulation, output in the input dtype.

A is [M, K] with unit stride along K; B is [K, N] with unit stride along N (row-major) or along K
(the transpose of a row-major [N, K] weight, as ``x @ w.t()``); C is [M, N] row-major. Any M, N, K
(including 1 and sizes that are not multiples of a tile) work: loads wrap inside the matrices and
the store is masked.

Configuration: each shape bucket (by M: decode 1-16, 17-64, 65-128, and large) has an ordered
list of tile candidates. Selection takes, for the arch, the tuned winner if one is recorded
(``jitkern.tuning``), then the bucket's candidates; pins and ``JITKERN_GEMM_<PARAM>`` overrides are
applied and rule breakers dropped (``jitkern.constraints``); the first candidate whose compiled
artifact fits the arch's shared-memory budget (``jitkern.budget``) is used.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import torch

from .. import checks, constraints, counters, registry, runtime, state, tuning
from ..build import get_entry
from ..dispatch import dispatcher
from ..errors import ConfigError, OverBudgetError, ShapeError
from ..logs import warn_once
from ..plan import plan as plan_job
from ..render import builtin_template_dir
from ..spec import Arg, Candidate, Config, In, Launch, OpSpec, Scratch, Variant, Zeroed

OP = "gemm"
DTYPES = (torch.bfloat16, torch.float16)

#: Values each tile parameter may take at all (env overrides are checked against these).
TUNABLES = {
    "block_m": (16, 32, 64, 128, 256),
    "block_n": (16, 32, 64, 128, 256, 512),
    "block_k": (16, 32, 64, 128, 256, 512),
    "group_m": (1, 2, 4, 8, 16),
    "num_warps": (1, 2, 4, 8, 16),
    "num_stages": (1, 2, 3, 4, 5, 6, 7, 8),
    # Hopper path (sm_90 only, see HOPPER_RULES): TMA tensor descriptors; persistent grid (at most one
    # program per SM); Triton's automatic warp specialisation; epilogue stored in 1 or 2 column slices.
    "tma": (0, 1),
    "persistent": (0, 1),
    "warp_spec": (0, 1),
    "epi_split": (1, 2),
    # split-K (sm_90 decode buckets, see SPLIT_RULES): the K loop cut into this many slices, one program
    # per (output tile, slice), fp32 partials summed in slice order by the tile's last arriving program.
    "split_k": (1, 2, 3, 4, 6, 8),
}
TILE_PARAMS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
#: Parameters of the Hopper path, with the values a tile without them has; only tiles with tma=1
#: carry them (so every other config, and its cache key, is what it was before the path existed).
HOPPER_PARAMS = {"tma": 0, "persistent": 0, "warp_spec": 0, "epi_split": 1}
#: Arches without tensor-memory-accelerator descriptors keep tma=0 (their own tiles, unchanged).
HOPPER_RULES = tuple(constraints.Rule(a, OP, "tma", "TMA tensor descriptors are the Hopper (sm_90) path", allowed=(0,))
                     for a in ("gfx942", "gfx950", "sm_80", "sm_100", "cpu"))
constraints.add_rules(*HOPPER_RULES)
#: Split-K is tuned for the H200's 132 SMs; every other arch keeps its one-program-per-tile kernels.
SPLIT_RULES = tuple(constraints.Rule(a, OP, "split_k", "split-K tiles are tuned for sm_90's decode shapes", allowed=(1,))
                    for a in ("gfx942", "gfx950", "sm_80", "sm_100", "cpu"))
constraints.add_rules(*SPLIT_RULES)

#: Shape buckets by M: (name, largest M in it); the last one takes everything larger.
BUCKETS = (("m16", 16), ("m64", 64), ("m128", 128), ("large", None))
#: Decode buckets (every one but "large") are tuned apart for large weights: N * K above this (e.g.
#: N=K=8192, or 14336x4096) is the size class ``_w8k`` of tuning records, whose winner can use fewer
#: K slices than the N=K=4096 one (twice the output tiles). Lookups fall back to the size-free name.
BIG_WEIGHT = 6144 * 6144
SIZE_TAG = "_w8k"


def _t(bm, bn, bk, gm, nw, ns):
    return dict(block_m=bm, block_n=bn, block_k=bk, group_m=gm, num_warps=nw, num_stages=ns)


def _h(bm, bn, bk, gm, nw, ns, persistent=1, warp_spec=0, epi_split=1, split_k=1):
    """A Hopper (TMA) tile; dropped by HOPPER_RULES on every other arch."""
    t = dict(_t(bm, bn, bk, gm, nw, ns), tma=1, persistent=persistent, warp_spec=warp_spec, epi_split=epi_split)
    return dict(t, split_k=split_k) if split_k > 1 else t


def _sk(split_k, bm, bn, bk, nw, ns):
    """A split-K Hopper tile (one program per output tile and K slice; dropped by SPLIT_RULES and
    HOPPER_RULES on every other arch)."""
    return _h(bm, bn, bk, 1, nw, ns, 0, split_k=split_k)


def split_of(t: dict) -> int:
    return int(t.get("split_k", 1) or 1)


def tile_of(t: dict) -> dict:
    """The tile parameters of a candidate / tuned record: the six base ones, plus the Hopper ones
    when it is a TMA tile, plus ``split_k`` when it is over 1 (so every config without split-K, and
    its cache key, is what it was before split-K existed)."""
    tile = {k: t[k] for k in TILE_PARAMS}
    if t.get("tma"):
        tile.update({k: t.get(k, d) for k, d in HOPPER_PARAMS.items()})
    if split_of(t) > 1:
        tile["split_k"] = split_of(t)
    return tile


#: Candidates per bucket, most preferred first (before tuning). Early ones are deep or large tiles
#: that only fit the arches with the most shared memory (sm_90: 227 KiB; Triton keeps num_stages
#: buffers there, num_stages - 1 on AMD); later ones fit gfx950 (160 KiB) and gfx942 (64 KiB); the
#: last of each list fits all of them. Measured figures: ``tools/tune_gemm.py --offline``.
#: sm_90 (Hopper) tiles first, in every bucket: TMA descriptors, wgmma from shared memory; large
#: shapes persistent (at most one program per SM), optionally warp-specialised (num_warps=4: one
#: producer + one consumer warpgroup is what Triton 3.6's Hopper pass makes). Shared bytes compiled
#: for sm_90 (budget 232448): 128x256x64 s3 213016, s4 + 2-slice epilogue 229408; 128x128x64 ws s5
#: 197208, s6 229992; 64x64x128 s6 204848; 64x32x256 s4 200736; 16x64x256 s4 124952. Every other
#: arch drops them (HOPPER_RULES) and keeps the lists below unchanged.
HOPPER_CANDIDATES_BASE = {
    "m16": (_h(16, 64, 256, 1, 4, 4, 0), _h(16, 32, 256, 1, 4, 6, 0), _h(16, 32, 512, 1, 4, 4, 0),
            _h(16, 16, 512, 1, 4, 6, 0), _h(16, 64, 256, 1, 4, 5, 0), _h(16, 128, 128, 1, 4, 6, 0)),
    "m64": (_h(64, 32, 256, 1, 4, 4, 0), _h(64, 64, 128, 1, 4, 6, 0), _h(64, 32, 128, 1, 4, 8, 0),
            _h(64, 16, 256, 1, 4, 5, 0), _h(64, 64, 256, 1, 4, 3, 0), _h(64, 128, 64, 1, 4, 6, 0),
            _h(64, 128, 128, 1, 4, 4, 0), _h(64, 256, 64, 1, 4, 4, 0)),
    "m128": (_h(64, 64, 128, 1, 4, 6, 0), _h(128, 64, 128, 1, 4, 4, 0), _h(128, 32, 128, 1, 4, 5, 0),
             _h(64, 64, 128, 1, 4, 4, 0), _h(128, 64, 64, 1, 4, 6, 0), _h(64, 128, 64, 1, 4, 6, 0),
             _h(128, 128, 64, 1, 8, 4, 0), _h(128, 256, 64, 8, 8, 3), _h(128, 128, 128, 1, 8, 3, 0)),
    "large": (_h(128, 256, 64, 8, 8, 3), _h(128, 256, 64, 8, 8, 4, epi_split=2), _h(128, 256, 64, 8, 8, 3, epi_split=2),
              _h(128, 128, 64, 8, 4, 5, warp_spec=1), _h(128, 128, 64, 8, 4, 6, warp_spec=1), _h(256, 128, 64, 8, 8, 3),
              _h(256, 128, 64, 8, 8, 4, epi_split=2), _h(128, 256, 64, 8, 8, 3, 0), _h(128, 128, 64, 8, 8, 4),
              _h(128, 256, 64, 16, 8, 3)),
}

#: Split-K tiles for the decode buckets (sm_90), after the one-program-per-tile ones: at N=K=4096 a
#: 128x64 tile gives M=128 only 32 programs for 132 SMs; K slices multiply that (most of these make
#: about 128 programs, one wave, at N=4096 or 8192). The last ones, 16 columns by 8 slices, are for
#: skinny weights (a MoE router: N = experts = 8), where any wider tile leaves a few programs each
#: walking all of K. Shared bytes are those of the tile without
#: split-K (the partials go through global memory, L2-resident); compiled for sm_90: 122904 (16-row
#: tiles) to 196656 (64x64x128 s6), all within 232448.
SPLIT_CANDIDATES = {
    "m16": (_sk(2, 16, 64, 256, 4, 4), _sk(4, 16, 64, 256, 4, 4), _sk(4, 16, 128, 128, 4, 6), _sk(2, 16, 128, 128, 4, 6),
            _sk(2, 16, 32, 256, 4, 6), _sk(8, 16, 16, 256, 4, 4)),
    "m64": (_sk(2, 64, 64, 128, 4, 6), _sk(4, 64, 64, 128, 4, 6), _sk(2, 64, 128, 64, 4, 6), _sk(4, 64, 128, 64, 4, 6),
            _sk(2, 64, 32, 256, 4, 4), _sk(8, 32, 16, 128, 4, 4), _sk(8, 64, 16, 128, 4, 4)),
    "m128": (_sk(4, 128, 64, 64, 4, 6), _sk(2, 128, 64, 64, 4, 6), _sk(2, 128, 64, 128, 4, 4), _sk(4, 128, 64, 128, 4, 4), _sk(2, 64, 64, 128, 4, 6),
             _sk(4, 128, 128, 64, 8, 4), _sk(2, 128, 128, 64, 8, 4), _sk(8, 64, 16, 128, 4, 4), _sk(8, 32, 16, 128, 4, 4)),
    "large": (),
}
HOPPER_CANDIDATES = {b: HOPPER_CANDIDATES_BASE[b] + SPLIT_CANDIDATES[b] for b in HOPPER_CANDIDATES_BASE}

CANDIDATES = {
    "m16": (_t(16, 32, 256, 1, 4, 6), _t(16, 64, 256, 1, 4, 4), _t(16, 32, 256, 1, 4, 4), _t(16, 32, 128, 1, 4, 4),
            _t(16, 64, 128, 1, 4, 3), _t(16, 16, 256, 1, 2, 4), _t(16, 64, 64, 1, 4, 2)),
    "m64": (_t(64, 32, 256, 1, 4, 4), _t(64, 64, 128, 1, 4, 4), _t(64, 32, 128, 1, 4, 4), _t(32, 64, 128, 1, 4, 3),
            _t(64, 64, 64, 1, 4, 3), _t(64, 64, 64, 1, 4, 2)),
    # sm_90 only (224 KiB) -> fits gfx950 (96 KiB of LDS) -> fits gfx942 (64 KiB) -> smaller
    "m128": (_t(64, 64, 128, 1, 4, 7), _t(64, 64, 128, 1, 4, 4), _t(64, 64, 128, 1, 4, 3), _t(128, 64, 64, 1, 4, 3),
             _t(64, 32, 128, 1, 4, 3), _t(32, 64, 64, 1, 4, 2),
             # last, for tuning on sm_90 (every arch's default is one of the above): the H200's winners for
             # M=128 at N=6144/8192, K=4096/8192 (tools/results/gemm_tune_m128_model_h200_2026-12-03_1528.json)
             _t(128, 64, 64, 1, 4, 8)),
    "large": (_t(128, 256, 64, 8, 8, 4), _t(128, 256, 64, 8, 8, 3), _t(256, 128, 64, 8, 8, 3), _t(128, 128, 64, 8, 8, 4),
              _t(128, 128, 64, 8, 4, 3), _t(256, 128, 64, 8, 8, 4), _t(128, 128, 128, 8, 8, 3), _t(256, 256, 64, 8, 8, 2),
              _t(128, 128, 64, 8, 4, 2), _t(64, 64, 64, 8, 4, 2)),
}


def reference(a, b, out=None):
    c = (a.float() @ b.float()).to(a.dtype)
    if out is not None:
        out.copy_(c)
        return out
    return c


def bucket(m: int) -> str:
    for name, top in BUCKETS:
        if top is None or m <= top:
            return name
    raise AssertionError("unreachable")


def config(dtype: str, b_trans: bool, aligned: bool, tile: dict) -> Config:
    variant = "triton_split_k" if split_of(tile) > 1 else "triton"
    return Config.make(variant, dtype=dtype, b_trans=b_trans, aligned=aligned, **tile_of(tile))


def big_weight(n: int, k: int) -> bool:
    return n * k > BIG_WEIGHT


def tuning_bucket(bucket_name: str, b_trans: bool, big: bool = False, weight: Optional[tuple] = None) -> str:
    """The bucket name tuning records use: B's layout changes which tile wins, so ``w.t()``
    operands (unit stride along K) are tuned apart, as ``<bucket>_nk``; decode buckets with a big
    weight (``big_weight``) as ``<bucket>_w8k[_nk]``; ``weight`` ``(N, K)``: the record of that one
    weight shape, ``<bucket>_n<N>k<K>[_nk]`` (a model has a handful of them: tuned per shape, as
    serving engines ship their gemm configs)."""
    if weight is not None:
        size = f"_n{int(weight[0])}k{int(weight[1])}"
    else:
        size = SIZE_TAG if big and bucket_name != "large" else ""
    return f"{bucket_name}{size}_nk" if b_trans else f"{bucket_name}{size}"


def tuning_buckets(bucket_name: str, b_trans: bool, big: bool = False, weight: Optional[tuple] = None) -> tuple:
    """The tuning-record names a call looks up, most specific first: its weight shape (where given),
    size class and layout, layout, the bare bucket."""
    names = [tuning_bucket(bucket_name, b_trans, big), tuning_bucket(bucket_name, b_trans), bucket_name]
    if weight is not None:
        names.insert(0, tuning_bucket(bucket_name, b_trans, weight=weight))
    return tuple(dict.fromkeys(names))


_WEIGHT_TAG = re.compile(r"^(?P<bucket>[a-z0-9]+?)(?:_n(?P<n>\d+)k(?P<k>\d+)|(?P<big>_w8k))?(?P<nk>_nk)?$")


def parse_tuning_bucket(name: str) -> Optional[tuple]:
    """``tuning_bucket``'s inverse: ``(bucket, b_trans, big, weight)``, or None for another name."""
    got = _WEIGHT_TAG.match(name)
    if got is None or got["bucket"] not in dict(BUCKETS):
        return None
    weight = (int(got["n"]), int(got["k"])) if got["n"] else None
    return got["bucket"], bool(got["nk"]), bool(got["big"]), weight


def record_bucket(shape, b_trans: bool = False, exact: bool = False) -> str:
    """The tuning record a tuned ``(M, N, K)`` goes to: its bucket and size class, or with ``exact``
    its own weight shape's record (``tools/tune_gemm.py --per-weight``, and ``JITKERN_AUTOTUNE``)."""
    m, n, k = (int(x) for x in shape)
    return tuning_bucket(bucket(m), b_trans, big_weight(n, k), weight=(n, k) if exact else None)


def candidates(arch, dtype: str, bucket_name: str, tuned: bool = True, b_trans: bool = False,
               big: bool = False, weight: Optional[tuple] = None) -> list[dict]:
    """Tile candidates for ``arch`` (name or Arch) in order: tuned winner first (unless ``tuned`` is
    False; the first of ``tuning_buckets`` that has one), then the bucket's list; pins and
    ``JITKERN_GEMM_*`` overrides applied, rule breakers dropped."""
    name = getattr(arch, "name", arch)
    if tuned:
        found = None
        for b in tuning_buckets(bucket_name, b_trans, big, weight):
            found = tuning.lookup(name, OP, dtype, b)
            if found:
                break
        tuned = found
    listed = ([tuned] if tuned else []) + [dict(t, dtype=dtype) for t in HOPPER_CANDIDATES[bucket_name]
                                           + CANDIDATES[bucket_name]]
    found = constraints.apply(name, OP, [dict(t, dtype=dtype) for t in listed], TUNABLES)
    return [tile_of(t) for t in found]


def tile_aligned(tile: dict, n: int, k: int, strides=()) -> bool:
    return k % tile["block_k"] == 0 and n % 16 == 0 and k % 16 == 0 and all(s % 16 == 0 for s in strides)


def choose(arch, dtype: str, m: int, n: int, k: int, b_trans: bool = False, *, tuned: bool = True):
    """The config ``gemm`` uses on ``arch`` for this shape, found offline (no GPU): the op's own plan
    on meta tensors, then the first candidate whose compiled artifact fits the arch's budget.
    Returns ``(Config, rejected)`` with ``rejected`` the ``OverBudgetError.figures`` of the
    candidates skipped."""
    tdt = checks.TORCH_DTYPE[dtype]
    a = torch.empty(m, k, dtype=tdt, device="meta")
    b = torch.empty(n, k, dtype=tdt, device="meta").t() if b_trans else torch.empty(k, n, dtype=tdt, device="meta")
    out = torch.empty(m, n, dtype=tdt, device="meta")
    cands = _dispatch.candidates((a, b, out), arch, a.device, tuned=tuned)
    rejected = []
    for c in cands:
        cfg = c.launches[0].config
        if arch.backend is None:
            return cfg, rejected
        try:
            get_entry(plan_job(SPEC, cfg, arch))
        except OverBudgetError as e:
            rejected.append(e.figures)
            continue
        return cfg, rejected
    raise OverBudgetError(f"{OP}: no candidate for {dtype} M={m} fits the budget of {arch.name}; "
                          f"rejected: {[r.get('config') for r in rejected]}", {"rejected": rejected})


def estimated_shared_bytes(arch, tile: dict) -> int:
    """Shared memory a tile is expected to need: the A and B tiles once per pipeline buffer (Triton
    keeps num_stages buffers on NVIDIA, num_stages - 1 on AMD). An upper bound for the measured
    figures (``tools/tune_gemm.py --offline``); only used to bound what prebuild compiles: the
    budget check always uses the compiled artifact's real figure."""
    per_stage = (tile["block_m"] + tile["block_n"]) * tile["block_k"] * 2
    buffers = tile["num_stages"] if arch.vendor == "nvidia" else max(1, tile["num_stages"] - 1)
    return per_stage * buffers


def configs(arch):
    """What the runtime may select on ``arch`` (prebuild compiles this list): per dtype, bucket and
    B layout, the candidates in order up to the first one expected to fit the budget, and one more
    in case it does not. Candidates before it are compiled too, so their rejection is recorded and
    no process compiles them again. (``JITKERN_AUTOTUNE=1`` times every candidate: tuning is its own
    step, not covered by prebuild.)"""
    seen = set()
    for dtype in ("bf16", "fp16"):
        classes = [(b_name, b_trans, big, None) for b_name, _ in BUCKETS
                   for b_trans, big in ((False, False), (True, False), (False, True), (True, True))
                   if not (big and b_name == "large")]
        # the shipped per-weight-shape winners too (a model's own shapes, tools/tune_gemm.py --per-weight)
        shipped = tuning.shipped_table(arch.name).get("ops", {}).get(OP, {}).get(dtype, {})
        classes += [c for c in map(parse_tuning_bucket, sorted(shipped)) if c is not None and c[3] is not None]
        for b_name, b_trans, big, weight in classes:
            # a bad override raises ConfigError here as at call time: prebuild must not build a silent subset
            tiles = candidates(arch, dtype, b_name, b_trans=b_trans, big=big, weight=weight)
            fits = [arch.backend is None or estimated_shared_bytes(arch, t) <= arch.shared_mem_per_block
                    for t in tiles]
            first = fits.index(True) if True in fits else len(tiles) - 1
            for tile in tiles[:first + 2]:
                for aligned in (True, False):
                    cfg = config(dtype, b_trans, aligned, tile)
                    if cfg not in seen:
                        seen.add(cfg)
                        yield cfg


def tune_candidates(arch, dtype: str, shapes, b_trans: bool) -> list[dict]:
    """The tiles tuning times for ``shapes`` (one bucket, sized by the first shape): the bucket's
    candidates, after the record of their one weight shape where they share one."""
    m0, n0, k0 = shapes[0]
    one_weight = len({(n, k) for _, n, k in shapes}) == 1
    return candidates(arch, dtype, bucket(m0), b_trans=b_trans, big=big_weight(n0, k0),
                      weight=(n0, k0) if one_weight else None)


def tune_args(dtype: str, shapes, b_trans: bool, device):
    """What ``jitkern.tuning`` needs to benchmark gemm candidates on ``shapes`` [(M, N, K), ...] of
    one bucket: (candidate Configs, ``run(cfg) -> function launching every shape once``, info,
    ``check(fn)``: whether that function's results are right)."""
    shapes = [tuple(int(x) for x in s) for s in shapes]
    if any(len(s) != 3 for s in shapes):
        raise ConfigError(f"{OP}: tune shapes are MxNxK (three sizes), got {shapes}")
    buckets = {bucket(s[0]) for s in shapes}
    if len(buckets) != 1:
        raise ShapeError(f"{OP}: tune shapes of one M bucket at a time; got buckets {sorted(buckets)}")
    tdt = checks.TORCH_DTYPE[dtype]
    tensors = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=tdt)
        b = torch.randn(n, k, device=device, dtype=tdt).t() if b_trans else torch.randn(k, n, device=device, dtype=tdt)
        c = torch.empty(m, n, device=device, dtype=tdt)
        tensors.append((a, b, c, (a.stride(0), b.stride(1) if b_trans else b.stride(0), c.stride(0))))
    _, build_arch = runtime.arches_for(device)
    m0, n0, k0 = shapes[0]
    cfgs = []
    for t in tune_candidates(build_arch, dtype, shapes, b_trans):
        cfg = config(dtype, b_trans, tile_aligned(t, n0, k0, tensors[0][3]), t)
        if cfg not in cfgs:
            cfgs.append(cfg)

    def run(cfg):
        tile = tile_of(cfg.p)
        launches = []
        for (m, n, k), (a, b, c, strides) in zip(shapes, tensors):
            kern = runtime.kernel(SPEC, config(dtype, b_trans, tile_aligned(tile, n, k, strides), tile), device)
            grid = _grid(dict(tile, aligned=tile_aligned(tile, n, k, strides)), m, n, device)
            # split-K: the workspace once per shape (what a call allocates), counters zeroed once (kept)
            extra = [torch.empty(shape, dtype=dt, device=device) if isinstance(buf, Scratch)
                     else torch.zeros(shape, dtype=dt, device=device)
                     for buf in split_buffers(tile, m, n) for shape, dt in ((buf.shape, buf.dtype),)]
            launches.append((kern[(grid,)], (a, b, c, m, n, k, *strides, *extra)))

        def launch_all():
            for fn, args in launches:
                fn(*args)
        return launch_all

    wants = []

    def check(fn) -> Optional[str]:
        """Outputs poisoned with NaN, ``fn`` run, each compared with fp32 torch (what gemm's own
        tests allow a 16-bit gemm: 2% of the reference's largest magnitude)."""
        if not wants:
            wants.extend((a.float() @ b.float()) for a, b, _, _ in tensors)
        for _, _, c, _ in tensors:
            c.fill_(float("nan"))
        fn()
        for (m, n, k), (_, _, c, _), want in zip(shapes, tensors, wants):
            err, scale = (c.float() - want).abs().max().item(), want.abs().max().item()
            if not err <= 0.02 * max(scale, 1.0):  # NaN fails too
                return f"{m}x{n}x{k}: max abs error {err:.4g} against a reference of magnitude {scale:.4g}"
        return None

    return cfgs, run, {"shapes": [list(s) for s in shapes], "b_trans": b_trans}, check


def output_tiles(p, m, n) -> int:
    return -(-m // p["block_m"]) * -(-n // p["block_n"])


def split_buffers(p, m, n) -> tuple:
    """The buffers a split-K launch takes after its nine arguments: the fp32 partial tiles (a
    ``Scratch`` per call: [tiles, split, block_m, block_n]) and the per-tile arrival counters (a
    ``Zeroed`` buffer, kept: every launch leaves it zeroed). Empty without split-K."""
    split = split_of(p)
    if split <= 1:
        return ()
    tiles = output_tiles(p, m, n)
    return (Scratch((tiles * split * p["block_m"] * p["block_n"],), torch.float32, "split_k_partials"),
            Zeroed((tiles,), torch.int32, "split_k_arrivals"))


def _grid(p, m, n, device=None) -> int:
    """Programs to launch: one per output tile (times the K slices with split-K), or for the
    persistent (TMA, aligned) kernel at most one per SM of ``device`` (its programs stride over the
    tiles)."""
    tiles = output_tiles(p, m, n)
    if split_of(p) > 1:
        return tiles * split_of(p)
    if p.get("persistent") and p.get("tma") and p.get("aligned"):
        return min(tiles, _programs(device))
    return tiles


@functools.lru_cache(maxsize=None)
def _programs(device) -> int:
    """How many programs a persistent kernel runs on ``device``: its SM count (4 on the CPU)."""
    if device is None or torch.device(device).type != "cuda":
        return 4
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


#: Float dtypes no gemm kernel takes but torch.matmul does: such calls are routed, not refused.
TORCH_ONLY_DTYPES = (torch.float32, torch.float64)


def torch_route(a, b, out) -> Optional[str]:
    """Why a call goes to ``torch.matmul`` instead of a kernel, or None (the guard of the kernel path:
    a few type and dtype comparisons, no exception). Tensor subclasses (a torchao quantized weight,
    seed 000) hold data the kernel cannot read; fp32/fp64 have no kernel."""
    tensors = (a, b) if out is None else (a, b, out)
    if any(isinstance(t, torch.Tensor) and type(t) is not torch.Tensor for t in tensors):
        return "a tensor subclass (e.g. a quantized weight), which gemm kernels cannot read"
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype in TORCH_ONLY_DTYPES \
            and b.dtype == a.dtype:
        return f"dtype {str(a.dtype).replace('torch.', '')}, which no gemm kernel takes"
    return None


def _torch_gemm(a, b, out, why: str):
    counters.bump("guard_refusals")
    warn_once((OP, "torch", why), "jitkern: %s: routing calls with %s to torch.matmul", OP, why)
    if out is None:
        return torch.matmul(a, b)
    torch.matmul(a, b, out=out)
    return out


def plan(call):
    """Validate one call signature; candidates are the bucket's tiles as they apply on the arch."""
    a, b, out = call.args
    why = torch_route(a, b, out)
    if why is not None:
        return Candidate(torch=lambda a, b, out: _torch_gemm(a, b, out, why), name="torch.matmul")
    checks.tensor(OP, "a", a, dtypes=DTYPES, ndim=2)
    checks.tensor(OP, "b", b, dtypes=DTYPES, ndim=2, like=a)
    checks.same_dtype(OP, "b", b, a, "a")
    m, k = a.shape
    if b.shape[0] != k:
        raise ShapeError(f"{OP}: a is {tuple(a.shape)} and b is {tuple(b.shape)}; b must have {k} rows "
                         f"(a's columns) for a @ b")
    n = b.shape[1]
    checks.unit_last_stride(OP, "a", a)
    b_trans = b.stride(1) != 1 and n > 1
    if b_trans and b.stride(0) != 1 and k > 1:
        raise checks.LayoutError(f"{OP}: b must have unit stride along N (row-major [K, N]) or along K (the "
                                 f"transpose of a row-major [N, K]), got strides {tuple(b.stride())}; "
                                 f"pass b.contiguous()")
    checks.tensor(OP, "out", out, ndim=2, like=a)
    checks.same_dtype(OP, "out", out, a, "a")
    checks.shape(OP, "out", out, (m, n))
    checks.unit_last_stride(OP, "out", out)
    if m == 0 or n == 0:
        return None
    if k == 0:
        return Candidate(torch=lambda a, b, out: out.zero_(), name="zeros")
    for what, size in (("M", m), ("N", n), ("K", k)):
        checks.fits_i32(OP, what, size)
    stride_b = b.stride(1) if b_trans else b.stride(0)
    strides = (a.stride(0) if m > 1 else k, stride_b if (n > 1 if b_trans else k > 1) else (k if b_trans else n),
               out.stride(0) if m > 1 else n)
    dtype = checks.TRITON_TYPE[a.dtype]
    b_name = bucket(m)
    if tuning.autotune_enabled() and call.arch.backend is not None and call.device.type == "cuda":
        tuning.ensure_tuned(SPEC, call.arch, dtype, record_bucket((m, n, k), b_trans, exact=True),
                            lambda: tune_args(dtype, [(m, n, k)], b_trans, call.device))
    tiles = call.tiles([dict(t, dtype=dtype) for t in HOPPER_CANDIDATES[b_name] + CANDIDATES[b_name]], dtype=dtype,
                       bucket=tuning_buckets(b_name, b_trans, big_weight(n, k), (n, k)))
    out = []
    ins = (In("a"), In("b"), In("out"))
    for t in tiles:
        tile, split, configs = _prepared(dtype, b_trans, t)
        bufs = split_buffers(tile, m, n) if split > 1 else ()
        if bufs:  # the kernel indexes its workspace with 32-bit offsets
            checks.fits_i32(OP, "the split-K workspace", bufs[0].shape[0])
        aligned = tile_aligned(tile, n, k, strides)
        grid = _grid(dict(tile, aligned=aligned), m, n, call.device)
        out.append(Candidate(Launch(configs[aligned], (grid,), (*ins, m, n, k, *strides, *bufs))))
    return out


#: (dtype, b_trans, a candidate as ``call.tiles`` gives it) -> (its tile, split_k, {aligned: Config}):
#: pure, and the same few dozen tiles come back for every gemm signature of a process.
_tiles_prepared: dict = {}


def _prepared(dtype: str, b_trans: bool, t: dict) -> tuple:
    memo = (dtype, b_trans, tuple(t.items()))
    got = _tiles_prepared.get(memo)
    if got is None:
        tile = tile_of(t)
        if len(_tiles_prepared) >= 4096:
            _tiles_prepared.clear()
        got = _tiles_prepared[memo] = (tile, split_of(tile), {a: config(dtype, b_trans, a, tile) for a in (False, True)})
    return got


@state.on_reset
def _forget() -> None:
    _tiles_prepared.clear()


def gemm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` for 2-D bf16/fp16 ``a`` [M, K] and ``b`` [K, N] (fp32 accumulation).

    ``a`` needs unit stride along K; ``b`` unit stride along N or along K (e.g. ``w.t()`` for a
    row-major weight ``w`` [N, K]). ``out``: [M, N], same dtype, unit stride along N; allocated if
    not given. Returns ``out``. Tensor subclasses and fp32/fp64 inputs go to ``torch.matmul``
    (``torch_route``), with one warning per reason.
    """
    if out is None:
        why = torch_route(a, b, out)
        if why is not None:
            return _torch_gemm(a, b, out, why)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2:
            out = torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)
    _dispatch(a, b, out)  # with out given, the plan routes subclasses and fp32/fp64 (their types are in the signature)
    return out


def alloc(a, b, out=None):
    """The output buffer ``gemm`` allocates when ``out`` is None (torch.compile path)."""
    return {"out": torch.empty((a.shape[0], b.shape[1]), device=a.device, dtype=a.dtype)}


_ARGS = (
    Arg("a_ptr", "*{dtype}"), Arg("b_ptr", "*{dtype}"), Arg("c_ptr", "*{dtype}"),
    Arg("M", "i32"), Arg("N", "i32", divisible_if="aligned"), Arg("K", "i32", divisible_if="aligned"),
    Arg("stride_am", "i32", divisible_if="aligned"), Arg("stride_b", "i32", divisible_if="aligned"),
    Arg("stride_cm", "i32", divisible_if="aligned"),
)

SPEC = registry.register(OpSpec(
    name=OP,
    variants=(
        Variant(name="triton", template="triton.py.j2", kernel="gemm_kernel", args=_ARGS),
        # the same template with split_k > 1: two more arguments, the partials workspace and the
        # per-tile arrival counters (split_buffers)
        Variant(name="triton_split_k", template="triton.py.j2", kernel="gemm_kernel",
                args=_ARGS + (Arg("ws_ptr", "*fp32"), Arg("cnt_ptr", "*i32"))),
    ),
    template_dir=builtin_template_dir() / OP,
    fn=gemm,
    reference=reference,
    configs=configs,
    plan=plan,
    tunables=TUNABLES,
    doc=__doc__,
    extra={"buckets": BUCKETS, "tune_args": tune_args,
           "tuning_bucket": record_bucket},
    outputs=("out",),
    alloc=alloc,
))
_dispatch = dispatcher(SPEC)
