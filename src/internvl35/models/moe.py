"""Sparse MLP for Qwen3-MoE: softmax router, top-k, renormalised weights, grouped expert dispatch.

Expert weights are stacked ([E, 2I, D] and [E, D, I]) so tokens are sorted by expert once and each
active expert runs one matmul over all of its tokens; the checkpoint's per-expert keys are packed into
these tensors by the weight loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.config import TextConfig
from internvl35.models.layers import linear


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, dim))  # [E, 2I, D]
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, inter))  # [E, D, I]
        if not self.down_proj.is_meta:  # a loader fills them (and normal_ on meta imports torch._dynamo)
            nn.init.normal_(self.gate_up_proj, std=0.02)
            nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D]; expert_ids, weights [N, k] -> [N, D]."""
        N, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // k  # token index of each sorted assignment
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        w = weights.reshape(-1)[order, None]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token_of[start:start + n]
            gate, up = linear(x[idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = linear(F.silu(gate) * up, self.down_proj[e]) * w[start:start + n]
            out.index_add_(0, idx, y.to(out.dtype))
            start += n
        return out


class Qwen3MoE(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe = cfg.moe
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=False)
        self.experts = StackedExperts(cfg.moe.num_experts, cfg.hidden_size, cfg.moe.expert_intermediate_size)
        self.last_router_logits: torch.Tensor | None = None  # read by the training loss (aux loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)  # [N, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = probs.topk(self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.last_router_logits = logits if self.training else None
        return self.experts(x, expert_ids, weights.to(x.dtype)).reshape(shape)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style auxiliary loss: E * sum_e(fraction of assignments to e * mean router prob of e)."""
    probs = F.softmax(router_logits.float(), dim=-1)  # [N, E]
    E = probs.shape[-1]
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).float().sum(1)  # [N, E]
    return E * (chosen.mean(0) * probs.mean(0)).sum() / top_k
