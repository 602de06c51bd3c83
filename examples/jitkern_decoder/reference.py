"""The same decoder in plain PyTorch, written independently of jitkern (no jitkern import).

A dense KV cache ``[B, max_seq_len, kv_heads, head_dim]`` per layer, HF-style rotary embedding
(``rotate_half``, NeoX pairing), RMSNorm in fp32, attention through SDPA (causal for the prompt,
a length mask for decode steps), and the MoE layer as a dense mixture over all experts (each
token's output is the routing-weighted sum of its top-k experts' SiLU-gated MLPs). ``dtype``:
``torch.float32`` for the numerics reference (weights are the same bf16 values, upcast), bf16 for
the speed reference (compiled with ``torch.compile`` in tools/bench_model_load.py).

``forced_routes``: ``{layer: top-k expert ids}`` to route MoE layers as another run did (the
routing weights are still this model's own softmax at those experts): near-ties in the router can
pick a different expert under bf16 rounding, which is a legitimate difference, not an error.
"""
from __future__ import annotations

import math

import torch

from .config import DecoderConfig


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope_tables(cfg: DecoderConfig, device, dtype=torch.float32):
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64, device=device)
                                   / cfg.head_dim))
    ang = torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class ReferenceDecoder(torch.nn.Module):
    def __init__(self, cfg: DecoderConfig, weights: dict, batch: int, dtype=torch.float32):
        super().__init__()
        self.cfg, self.batch, self.dtype = cfg, batch, dtype
        dev = weights["embed"].device
        for name, t in weights.items():
            self.register_buffer(name.replace(".", "_"), t.to(dtype), persistent=False)
        shape = (batch, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim)
        for i in range(cfg.layers):
            self.register_buffer(f"k_cache{i}", torch.zeros(shape, dtype=dtype, device=dev), persistent=False)
            self.register_buffer(f"v_cache{i}", torch.zeros(shape, dtype=dtype, device=dev), persistent=False)
        cos, sin = rope_tables(cfg, dev)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=dev), persistent=False)
        self.register_buffer("cols", torch.arange(cfg.max_seq_len, device=dev), persistent=False)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def _w(self, name):
        return getattr(self, name.replace(".", "_"))

    def prefill(self, tokens, forced_routes=None):
        b, t = tokens.shape
        pos = torch.arange(t, device=tokens.device)[None, :].expand(b, t)
        x = self._forward(tokens, pos, forced_routes, prefill=True)
        return x[:, -1] @ self._w("lm_head").t()

    def decode(self, tokens, positions, forced_routes=None):
        x = self._forward(tokens[:, None], positions[:, None], forced_routes, prefill=False)
        return x[:, 0] @ self._w("lm_head").t()

    def _forward(self, tokens, pos, forced_routes, prefill):
        cfg = self.cfg
        h = self._w("embed")[tokens]  # [B, T, H]
        for i in range(cfg.layers):
            p = f"layers.{i}."
            h = h + self._attention(i, rms_norm(h, self._w(p + "attn_norm"), cfg.eps), pos, prefill)
            x = rms_norm(h, self._w(p + "mlp_norm"), cfg.eps)
            if cfg.is_moe(i):
                h = h + self._moe(i, x, None if forced_routes is None else forced_routes.get(i))
            else:
                h = h + self._mlp(i, x)
        return rms_norm(h, self._w("final_norm"), cfg.eps)

    def _attention(self, i, x, pos, prefill):
        cfg = self.cfg
        p = f"layers.{i}."
        b, t, _ = x.shape
        hq, hkv, d = cfg.q_heads, cfg.kv_heads, cfg.head_dim
        qkv = x @ self._w(p + "qkv").t()
        q = qkv[..., : hq * d].view(b, t, hq, d)
        k = qkv[..., hq * d: (hq + hkv) * d].view(b, t, hkv, d)
        v = qkv[..., (hq + hkv) * d:].view(b, t, hkv, d)
        q = rms_norm(q, self._w(p + "q_norm"), cfg.eps)
        k = rms_norm(k, self._w(p + "k_norm"), cfg.eps)
        cos, sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(self.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(self.dtype)
        kc, vc = getattr(self, f"k_cache{i}"), getattr(self, f"v_cache{i}")
        if prefill:
            kc[:, :t] = k
            vc[:, :t] = v
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale,
                enable_gqa=hkv != hq)
        else:
            kc[self.rows, pos[:, 0]] = k[:, 0]
            vc[self.rows, pos[:, 0]] = v[:, 0]
            mask = self.cols[None, :] <= pos  # [B, S]
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask[:, None, None, :],
                scale=self.scale, enable_gqa=hkv != hq)
        return o.transpose(1, 2).reshape(b, t, hq * d) @ self._w(p + "o").t()

    def _mlp(self, i, x):
        p = f"layers.{i}."
        m = self.cfg.intermediate
        gu = x @ self._w(p + "gate_up").t()
        return (torch.nn.functional.silu(gu[..., :m]) * gu[..., m:]) @ self._w(p + "down").t()

    def _moe(self, i, x, forced):
        cfg = self.cfg
        p = f"layers.{i}."
        b, t, hsz = x.shape
        n = cfg.expert_intermediate
        probs = torch.softmax((x @ self._w(p + "router").t()).float(), dim=-1)  # [B, T, E]
        if forced is None:
            top_w, top_i = probs.topk(cfg.topk, dim=-1)
        else:
            top_i = forced.view(b, t, cfg.topk)
            top_w = probs.gather(-1, top_i)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        combine = torch.zeros_like(probs).scatter_(-1, top_i, top_w)  # [B, T, E]: 0 for experts not chosen
        w1, w2 = self._w(p + "w1"), self._w(p + "w2")  # [E, 2N, H], [E, H, N]
        gu = torch.einsum("bth,enh->bten", x, w1)
        a = torch.nn.functional.silu(gu[..., :n]) * gu[..., n:]
        y = torch.einsum("bten,ehn->bteh", a, w2)
        return (y.float() * combine[..., None]).sum(2).to(self.dtype)
