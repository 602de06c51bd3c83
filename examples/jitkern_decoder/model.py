"""The decoder on jitkern ops: prefill a batch of prompts, then decode one token per sequence per step.

Per layer (pre-norm, fused residual add):

* ``jitkern.ops.rms_norm(h, w, residual=res)``: ``res += h``, normalise ``res`` (the first layer
  normalises the embeddings without a residual);
* QKV projection: ``jitkern.ops.gemm(x, w_qkv.t())``;
* ``jitkern.ops.qk_norm_rope_cache``: Qwen3's per-head q/k RMSNorm and NeoX rotary embedding, in place,
  fused with the write of k and v into the paged KV cache at the tokens' slots;
* attention: decode through ``jitkern.ops.paged_attention_decode`` over the paged cache; prefill
  through ``jitkern.ops.prefill_attention`` (causal, GQA, variable-length sequences by ``cu_seqlens``)
  on q, k and v as views of the QKV projection;
* output projection: ``jitkern.ops.gemm``;
* MLP, dense layers: gate/up ``gemm``, ``jitkern.ops.silu_and_mul``, down ``gemm``;
* MLP, MoE layers: router ``gemm``, ``jitkern.ops.moe_topk_softmax`` (the top-k experts and their
  renormalised probabilities), pairs sorted by expert on the device by
  ``jitkern.ops.moe_align`` (its sorting block grows with the step's tokens, ``DecoderConfig.moe_block``),
  ``jitkern.ops.moe_gemm_stage1`` (gate-up GEMM of each pair's expert with SiLU-and-mul fused,
  ``[pairs, N]``), then the down projection as a grouped GEMM:
  the same op with ``activation="none"`` and ``topk=1`` over those ``[pairs, N]`` rows and the same
  sorted tables (a pair id ``token * topk + slot`` is its row of the stage-1 output), each pair
  against its own expert's ``w2`` [experts, hidden, N] (``[pairs, hidden]``; the weights and FLOPs of
  the experts the step routes to, as vLLM's fused_moe does for stage 2); ``jitkern.ops.moe_combine``
  weights each pair by its router probability and sums over the top-k. No host syncs (the tables stay
  on the device), so CUDA graphs can capture the step.

Final ``rms_norm`` (fused residual) and the LM head ``gemm``. Torch itself runs only the embedding
lookup, views, and (decode) the slot arithmetic; a prefill's positions, slots and ``cu_seqlens`` come
from the host, as a serving engine's scheduler makes them. Every step is tensor ops only (no
``.item()``, no Python data-dependent branching), so ``decode`` can be captured in a CUDA graph or
compiled with ``torch.compile``.
"""
from __future__ import annotations

import math

import torch

import jitkern
from jitkern.library.qk_norm_rope import cos_sin_table

from .config import DecoderConfig


def _attr(weight_name: str) -> str:
    return "w_" + weight_name.replace(".", "_")


class JitkernDecoder(torch.nn.Module):
    """``prefill(tokens [B, T]) -> logits [B, vocab]`` then ``decode(tokens [B], positions [B])``.

    Weights are the dict from ``make_weights``, registered as buffers (the same tensors). The paged KV cache has
    ``cfg.blocks_per_seq`` pages per sequence, handed out in a shuffled order (block tables are not
    the identity). ``record_routes``: MoE layers copy their top-k expert ids into ``routes[layer]``
    (static buffers, so graph replays fill them too) for a reference to route the same way.
    """

    def __init__(self, cfg: DecoderConfig, weights: dict, batch: int, device=None, record_routes: bool = False,
                 seed: int = 0):
        super().__init__()
        self.cfg, self.batch, self.record_routes = cfg, batch, record_routes
        device = torch.device(device) if device is not None else weights["embed"].device
        for name, t in weights.items():  # buffers: torch.compile's CUDA graphs treat them as static
            self.register_buffer(_attr(name), t, persistent=False)
        dtype = weights["embed"].dtype
        nb = batch * cfg.blocks_per_seq
        shape = (nb, cfg.page_size, cfg.kv_heads, cfg.head_dim)
        for i in range(cfg.layers):
            self.register_buffer(f"k_cache{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v_cache{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))
        #: the block tables as the host-side scheduler keeps them (a prefill's slots are made from these)
        self.host_block_tables = perm.view(batch, -1).to(torch.int32)
        self.register_buffer("block_tables", self.host_block_tables.to(device), persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=device), persistent=False)
        self.register_buffer("cos_sin", cos_sin_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_base, device=device),
                             persistent=False)
        if record_routes:
            for i in range(cfg.layers):
                if cfg.is_moe(i):
                    self.register_buffer(f"route{i}", torch.zeros(batch * cfg.max_seq_len, cfg.topk, dtype=torch.int64,
                                                                  device=device), persistent=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    @property
    def routes(self) -> dict:
        """``{layer: [tokens, topk] expert ids}`` of the last step (``record_routes``)."""
        return {i: getattr(self, f"route{i}") for i in range(self.cfg.layers) if hasattr(self, f"route{i}")}

    def _w(self, name: str) -> torch.Tensor:
        return getattr(self, _attr(name))

    # ---- one step ------------------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prompts ``tokens`` [B, T] (all of length T) at positions 0..T-1: logits of the last token."""
        b, t = tokens.shape
        # positions and KV-cache slots made on the host, as a serving engine's scheduler makes them, and
        # copied over (no index arithmetic kernels on the device)
        pos = torch.arange(t).repeat(b)
        seq = torch.arange(b).repeat_interleave(t)
        slots = self.host_block_tables[seq, pos // self.cfg.page_size].long() * self.cfg.page_size \
            + pos % self.cfg.page_size
        cu_seqlens = torch.arange(0, (b + 1) * t, t, dtype=torch.int32)
        pos, slots, cu_seqlens = (z.to(tokens.device) for z in (pos, slots, cu_seqlens))
        out = self._forward(tokens.reshape(-1), pos, slots, prefill=(cu_seqlens, t))
        return self._logits(out.view(b, t, -1)[:, -1])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per sequence (``tokens`` [B], at ``positions`` [B] int64): its logits [B, vocab]."""
        page = self.cfg.page_size  # slots on the device: a CUDA graph of the step makes them from `positions`
        slots = self.block_tables[self.rows, positions // page].long() * page + positions % page
        return self._logits(self._forward(tokens, positions, slots, prefill=None))

    # ---- layers --------------------------------------------------------------------------------
    def _forward(self, tokens, pos, slots, prefill):
        cfg, w, ops = self.cfg, self._w, jitkern.ops
        seq_lens = (pos + 1).to(torch.int32) if prefill is None else None
        res = w("embed")[tokens]  # [T, H]: the residual stream (a new tensor: indexing copies)
        h = None
        for i in range(cfg.layers):
            p = f"layers.{i}."
            x = ops.rms_norm(res if h is None else h, w(p + "attn_norm"), cfg.eps,
                             residual=None if h is None else res)
            h = self._attention(i, x, pos, slots, seq_lens, prefill)
            x = ops.rms_norm(h, w(p + "mlp_norm"), cfg.eps, residual=res)
            h = self._moe(i, x) if cfg.is_moe(i) else self._mlp(i, x)
        return ops.rms_norm(h, w("final_norm"), cfg.eps, residual=res)

    def _logits(self, x):
        return jitkern.ops.gemm(x.contiguous(), self._w("lm_head").t())

    def _attention(self, i, x, pos, slots, seq_lens, prefill):
        cfg, w, ops = self.cfg, self._w, jitkern.ops
        p = f"layers.{i}."
        hq, hkv, d = cfg.q_heads, cfg.kv_heads, cfg.head_dim
        n = x.shape[0]
        qkv = ops.gemm(x, w(p + "qkv").t())
        k_cache, v_cache = getattr(self, f"k_cache{i}"), getattr(self, f"v_cache{i}")
        ops.qk_norm_rope_cache(qkv, w(p + "q_norm"), w(p + "k_norm"), self.cos_sin, pos, slots, k_cache, v_cache,
                               hq, hkv, d, cfg.eps, True)
        q = qkv[:, : hq * d].view(n, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(n, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        if prefill is None:
            o = ops.paged_attention_decode(q, k_cache, v_cache, self.block_tables, seq_lens, self.scale,
                                           cfg.max_seq_len)
            o = o.view(n, hq * d)
        else:
            cu_seqlens, max_len = prefill
            o = ops.prefill_attention(q, k, v, cu_seqlens, max_len, self.scale).view(n, hq * d)
        return ops.gemm(o, w(p + "o").t())

    def _mlp(self, i, x):
        w, ops = self._w, jitkern.ops
        p = f"layers.{i}."
        a = ops.silu_and_mul(ops.gemm(x, w(p + "gate_up").t()))
        return ops.gemm(a, w(p + "down").t())

    def _moe(self, i, x):
        cfg, w, ops = self.cfg, self._w, jitkern.ops
        p = f"layers.{i}."
        e, k = cfg.experts, cfg.topk
        n = x.shape[0]
        top_w, top_i = ops.moe_topk_softmax(ops.gemm(x, w(p + "router").t()), k)  # renormalised, fp32
        if self.record_routes:
            getattr(self, f"route{i}")[:n].copy_(top_i)
        ids, eids, used = ops.moe_align(top_i, e, cfg.moe_block(n))
        hmid = ops.moe_gemm_stage1(x, w(p + "w1"), ids, eids, used, k, "silu")  # [n*k, N]
        # stage 2: row `pair` of hmid against its expert's w2 [H, N]: topk=1, the same tables
        y = ops.moe_gemm_stage1(hmid, w(p + "w2"), ids, eids, used, 1, "none")  # [n*k, H]
        return ops.moe_combine(y, top_w)  # each token's routing-weighted sum over its top-k, fp32 accumulation
