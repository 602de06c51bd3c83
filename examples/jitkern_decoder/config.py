"""Model shapes: a tiny config for CPU tests (Triton's interpreter) and Qwen3-8B shapes for the GPU."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DecoderConfig:
    """A Qwen3-style decoder: GQA attention with per-head q/k RMSNorm and NeoX rotary embedding,
    pre-norm residual blocks, and in every ``moe_every``-th layer a routed MoE MLP (softmax router,
    top-k, renormalised weights) in place of the dense SiLU-gated MLP."""

    vocab: int
    hidden: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width
    experts: int
    topk: int
    expert_intermediate: int
    moe_every: int = 2  # layers i with i % moe_every == moe_every - 1 are MoE; 0: none
    page_size: int = 16
    max_seq_len: int = 256  # KV cache tokens per sequence
    rope_base: float = 1_000_000.0
    eps: float = 1e-6
    moe_align: int = 16  # the smallest sorting block of moe_align (moe_gemm_stage1's block_m divides it)
    moe_align_max: int = 64  # the largest (moe_gemm_stage1's largest block_m)

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and layer % self.moe_every == self.moe_every - 1

    def moe_block(self, tokens: int) -> int:
        """The sorting block of a step over ``tokens`` tokens: the power of two at or above the mean pairs
        per expert, within ``[moe_align, moe_align_max]``. Where routing is even one kernel block then
        holds an expert's pairs (each expert's weights are read once), and small steps pad little."""
        mean = -(-tokens * self.topk // max(1, self.experts))
        return min(self.moe_align_max, max(self.moe_align, 1 << max(0, mean - 1).bit_length()))

    @property
    def qkv_width(self) -> int:
        return (self.q_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.max_seq_len // self.page_size)

    def with_(self, **kw) -> "DecoderConfig":
        return replace(self, **kw)


#: CPU tests: one dense and one MoE layer, every op at its smallest supported shape (head_dim 64).
TINY = DecoderConfig(vocab=256, hidden=128, layers=2, q_heads=4, kv_heads=2, head_dim=64, intermediate=192,
                     experts=4, topk=2, expert_intermediate=64, max_seq_len=64)


def qwen3_8b_shapes(layers: int = 8, max_seq_len: int = 1024) -> DecoderConfig:
    """Qwen3-8B's shapes (hidden 4096, 32 q / 8 kv heads of 128, MLP 12288, vocab 151936, rope base 1e6)
    cut to ``layers`` layers; every second layer is MoE-shaped: 8 experts, top-2, 1536 wide each (the
    dense MLP's width split eight ways)."""
    return DecoderConfig(vocab=151936, hidden=4096, layers=layers, q_heads=32, kv_heads=8, head_dim=128,
                         intermediate=12288, experts=8, topk=2, expert_intermediate=1536, max_seq_len=max_seq_len)
