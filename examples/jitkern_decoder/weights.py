"""Random weights for a DecoderConfig, one dict both models take (the same tensors, no copies).

Scales keep activations O(1) through the stack: projections ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2).
The router is scaled up (std 3/sqrt(hidden)) so that its top-k choices are not near ties.
"""
from __future__ import annotations

import torch

from .config import DecoderConfig


def make_weights(cfg: DecoderConfig, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(std)

    def norm(n):
        return rand(n, std=0.1).add_(1.0)

    h, d = cfg.hidden, cfg.head_dim
    w = {"embed": rand(cfg.vocab, h), "final_norm": norm(h), "lm_head": rand(cfg.vocab, h, std=h ** -0.5)}
    for i in range(cfg.layers):
        p = f"layers.{i}."
        w[p + "attn_norm"] = norm(h)
        w[p + "qkv"] = rand(cfg.qkv_width, h, std=h ** -0.5)  # [Wq; Wk; Wv] rows
        w[p + "q_norm"] = norm(d)
        w[p + "k_norm"] = norm(d)
        w[p + "o"] = rand(h, cfg.q_heads * d, std=(cfg.q_heads * d) ** -0.5)
        w[p + "mlp_norm"] = norm(h)
        if cfg.is_moe(i):
            n = cfg.expert_intermediate
            w[p + "router"] = rand(cfg.experts, h, std=3 * h ** -0.5)
            w[p + "w1"] = rand(cfg.experts, 2 * n, h, std=h ** -0.5)  # per expert: gate rows, then up rows
            w[p + "w2"] = rand(cfg.experts, h, n, std=n ** -0.5)
        else:
            w[p + "gate_up"] = rand(2 * cfg.intermediate, h, std=h ** -0.5)  # gate rows, then up rows
            w[p + "down"] = rand(h, cfg.intermediate, std=cfg.intermediate ** -0.5)
    return w
