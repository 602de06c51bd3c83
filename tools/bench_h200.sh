#!/usr/bin/env bash
# Issue 19 on one GPU, in one call: tune gemm (bf16, both B layouts, every M bucket), sweep the
# memory-bound ops' tiles, then run every benchmark of the issue's table with the winners.
#
#   OUT=/some/dir bash tools/bench_h200.sh            (from the repo root; JITKERN_CACHE_DIR optional)
#   STAGES="bench" bash tools/bench_h200.sh           (benchmarks only: the shipped tables as they are)
#   STAGES="model" bash tools/bench_h200.sh           (gemm per weight shape of the example decoder, tuned and
#                                                       benchmarked; the winners merged into $OUT/sm_90.json)
#   STAGES="membw" bash tools/bench_h200.sh           (tools/sweep_membw.py: memory-bound ops' tiles; then
#                                                       python3 tools/sweep_membw.py --apply $OUT/membw_sweep.json)
#
# Writes under $OUT: gemm_tune_{kn,nk}.json, sm_90.json (the shipped table with the new winners
# merged), seed_sweep.json, bench_gemm.json, seed_ops_bench.json, qk_norm_rope.json, and log.txt.
# gemm only (tune + bench, about 4 minutes on an H200):  OUT=dir STAGES="tune bench" GEMM_ONLY=1 bash tools/bench_h200.sh
# Decode buckets are tuned per weight size (m64_nk: N=K=4096, m64_w8k_nk: N=K=8192), split-K tiles included;
# apply the winners with: cp $OUT/sm_90.json jitkern/tuned/sm_90.json
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
STAGES=${STAGES:-"tune sweep bench"}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JITKERN_CACHE_DIR=${JITKERN_CACHE_DIR:-/tmp/jk}
unset TRITON_INTERPRET
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "== $(date -u +%FT%TZ) $(python3 -c 'import torch;print(torch.cuda.get_device_name())') stages: $STAGES"
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has tune; then
  cp jitkern/tuned/sm_90.json "$OUT/sm_90.json"
  shapes="4096x4096x4096,1x4096x4096,16x4096x4096,1x8192x8192,16x8192x8192,64x4096x4096,64x8192x8192,128x4096x4096,128x8192x8192"
  timeout ${T_TUNE:-120} python3 tools/tune_gemm.py --shapes "$shapes" --jobs 8 --out "$OUT/gemm_tune_kn.json" --write-table "$OUT/sm_90.json" | grep -v '^[ {}\[\]"]'
  timeout ${T_TUNE:-120} python3 tools/tune_gemm.py --shapes "$shapes" --jobs 8 --b-trans --out "$OUT/gemm_tune_nk.json" --write-table "$OUT/sm_90.json" | grep -v '^[ {}\[\]"]'
fi
if has model; then  # the decoder's weights (Qwen3-8B: QKV, O, gate/up, down, LM head, 8-expert router) at 1/32/128 rows
  [ -f "$OUT/sm_90.json" ] || cp jitkern/tuned/sm_90.json "$OUT/sm_90.json"
  shapes=$(for m in 128 32 1; do for nk in 6144x4096 4096x4096 24576x4096 4096x12288 151936x4096 8x4096; do
    printf '%s,' "${m}x$nk"; done; done)
  timeout ${T_MODEL:-150} python3 tools/tune_gemm.py --shapes "${shapes%,}" --per-weight --b-trans --jobs 12 \
    --out "$OUT/gemm_tune_model_nk.json" --write-table "$OUT/sm_90.json" | grep -E 'WINNER|tuned|wrote'
  timeout ${T_MODEL_BENCH:-100} python3 tools/bench_gemm.py --shapes "${shapes%,}" --dtype bf16 --layouts nk --rounds 1 \
    --rep 40 --out "$OUT/bench_gemm_model.json" | sed -n '/^{/q;p'
fi
if has bench; then
  timeout ${T_GEMM:-100} python3 tools/bench_gemm.py --dtype bf16,fp16 --rounds 2 --rep 60 --out "$OUT/bench_gemm.json" \
    | sed -n '/^{/q;p'
fi
if has sweep && [ -z "${GEMM_ONLY:-}" ]; then
  timeout ${T_SWEEP:-90} python3 tools/bench_seed_ops.py --sweep --sweep-ops mqa,gkv,pa --out "$OUT/seed_sweep.json" | tail -3
  # the winners (least total time over the sweep's shapes) as env overrides for the benchmarks
  eval "$(python3 - "$OUT/seed_sweep.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
prefix = {"paged_mqa_logits": "JITKERN_PAGED_MQA_LOGITS_", "gather_kv_cache": "JITKERN_GATHER_KV_CACHE_",
          "paged_attention_decode": "JITKERN_PAGED_ATTENTION_DECODE_"}
for op, p in prefix.items():
    rows = [r for r in doc.get(op, []) if all(isinstance(v, float) for k, v in r.items() if "=" in k and "TB/s" not in k)]
    if not rows:
        continue
    best = min(rows, key=lambda r: sum(v for k, v in r.items() if "=" in k and "TB/s" not in k))
    params = {k: v for k, v in best.items() if "=" not in k}
    print(f"echo sweep winner {op}: {' '.join(f'{k}={v}' for k, v in params.items())};"
          + "".join(f"export {p}{k.upper()}={v};" for k, v in params.items()))
EOF
)"
fi
if has membw; then  # the memory-bound ops' tiles and variants (issue 19 must-have 2): membw_sweep.json, membw_summary.json
  timeout ${T_MEMBW:-240} python3 tools/sweep_membw.py --out "$OUT" | sed -n '/^== winners/,$p'
fi
if has bench && [ -z "${GEMM_ONLY:-}" ]; then
  timeout ${T_SEED:-120} python3 tools/bench_seed_ops.py --ops pa,gkv,mqa --out "$OUT/seed_ops_bench.json"
  sweep=""; has sweep && sweep="--sweep"
  timeout ${T_QK:-45} python3 tools/check_qk_norm_rope_gpu.py $sweep --out "$OUT/qk_norm_rope.json" | grep -v "qk_norm_rope sweep"
fi
echo "== done $(date -u +%FT%TZ)"
