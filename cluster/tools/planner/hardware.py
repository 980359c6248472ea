"""What the planner knows without measuring: the accelerator's published figures and the model's
architecture, turned into FLOPs and bytes per token (DeepSeek-V3/R1 and Ascend 910B/910C defaults)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """One node's accelerators, from published figures (not fitted); `source` says where they come from."""

    name: str
    chips_per_node: int  # accelerators (dies) per node = TP ranks of one replica
    peak_tflops: float  # dense fp16/bf16 TFLOP/s per chip
    hbm_gb_s: float  # HBM bandwidth per chip
    intra_node_gb_s: float  # chip-to-chip bandwidth inside a node (HCCS), per chip
    inter_node_gb_s: float  # network bandwidth per chip between nodes (RoCE)
    a2a_latency_us: float  # fixed cost of one MoE dispatch or combine all-to-all across nodes
    source: str = ""


@dataclass(frozen=True)
class ModelArch:
    """A DeepSeek-V3-style MoE transformer with MLA attention (defaults: DeepSeek-V3/R1)."""

    name: str = "deepseek-r1"
    layers: int = 61
    dense_layers: int = 3  # the first layers have a dense MLP instead of experts
    hidden: int = 7168
    dense_intermediate: int = 18432
    routed_experts: int = 256
    experts_per_token: int = 8
    shared_experts: int = 1
    moe_intermediate: int = 2048
    heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_dim: int = 128
    qk_rope_dim: int = 64
    v_head_dim: int = 128
    vocab: int = 129280
    mtp_layers: int = 1  # DeepSeek's multi-token-prediction module: one extra MoE layer
    weight_bytes: float = 0.5  # bytes per linear-layer weight (w4a16: 4 bits; w8a8: 1; bf16: 2)
    head_bytes: float = 2.0  # bytes per embedding / LM head weight (kept in bf16 by AWQ)
    kv_bytes: float = 2.0  # bytes per cached latent element (bf16)

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def attention_params(self) -> int:
        """MLA weights of one layer: q down/up, kv down (latent + rope key), kv up, output."""
        h, nh = self.hidden, self.heads
        q_head = self.qk_nope_dim + self.qk_rope_dim
        return (h * self.q_lora_rank + self.q_lora_rank * nh * q_head
                + h * (self.kv_lora_rank + self.qk_rope_dim)
                + self.kv_lora_rank * nh * (self.qk_nope_dim + self.v_head_dim) + nh * self.v_head_dim * h)

    @property
    def expert_params(self) -> int:
        """One expert's gate, up and down projections."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    def static_params(self, layers: int, dense_layers: int, moe_layers: int) -> int:
        """Weights every token reads whatever its routing: attention, dense MLPs, shared experts."""
        return (layers * self.attention_params + dense_layers * 3 * self.hidden * self.dense_intermediate
                + moe_layers * self.shared_experts * self.expert_params)

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through (the LM head included, the embedding lookup not)."""
        return (self.static_params(self.layers, self.dense_layers, self.moe_layers) + self.head_params
                + self.moe_layers * self.experts_per_token * self.expert_params)

    @property
    def kv_bytes_per_token(self) -> float:
        """MLA cache per token over all layers: the compressed latent plus the rope key."""
        return self.layers * (self.kv_lora_rank + self.qk_rope_dim) * self.kv_bytes

    @property
    def attention_flops_per_pair(self) -> int:
        """Prefill attention FLOPs per layer for one (query, key) pair: QK^T over nope+rope dims and
        attention x V, all heads (MLA computed in its expanded form during prefill)."""
        return 2 * self.heads * (self.qk_nope_dim + self.qk_rope_dim + self.v_head_dim)

    @property
    def decode_attention_flops_per_pair(self) -> int:
        """Decode attention FLOPs per layer for one (query, cached token) pair, MLA in its absorbed form
        (queries projected into the latent): 2 x heads x (latent + rope key for scores, latent for values)."""
        return 2 * self.heads * (2 * self.kv_lora_rank + self.qk_rope_dim)

    def distinct_experts(self, tokens: float) -> float:
        """Expected distinct routed experts per MoE layer that `tokens` tokens activate, routing
        uniform and independent: E x (1 - (1 - k/E)^tokens)."""
        e = self.routed_experts
        return e * (1 - (1 - self.experts_per_token / e) ** tokens)


DEEPSEEK_R1 = ModelArch()

# Ascend 910B1 (Atlas 800T A2 class): ~400 TFLOP/s fp16 dense (vendor figure for the 910B1; the 910B3
# is ~313), 64 GB HBM2e at ~1.6 TB/s, HCCS 7 links x 56 GB/s = 392 GB/s per chip inside a node, one
# 200 Gb/s RoCE port (25 GB/s) per chip between nodes. The all-to-all latency is an assumption:
# DeepEP's low-latency kernels take ~80-170 us per dispatch at 128 tokens per rank on H800/InfiniBand;
# at decode's few tokens per rank we take 50 us per dispatch or combine.
ASCEND_910B1 = Hardware(
    "Ascend 910B1", chips_per_node=8, peak_tflops=400.0, hbm_gb_s=1600.0, intra_node_gb_s=392.0,
    inter_node_gb_s=25.0, a2a_latency_us=50.0,
    source="published 910B1 figures: 400 TFLOP/s fp16, 1.6 TB/s HBM, HCCS 392 GB/s, 200 Gb/s RoCE per chip; "
           "all-to-all latency 50 us assumed")

# Ascend 910C: two 910B-class dies per package; each die is taken as one 910B1 (same TFLOP/s and HBM
# bandwidth: 3.2 TB/s per package), 16 dies per node. A scaling assumption, not a 910C measurement.
ASCEND_910C_DIE = Hardware(
    "Ascend 910C (per die)", chips_per_node=16, peak_tflops=400.0, hbm_gb_s=1600.0, intra_node_gb_s=392.0,
    inter_node_gb_s=25.0, a2a_latency_us=50.0,
    source="910C = 2 x 910B-class dies; each die taken as a 910B1 (assumption, scaled by published ratios)")
