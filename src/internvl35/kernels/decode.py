"""The native single-sequence decode step (`decode_step.c`) bound to a model and its StaticKVCache.

It applies (`NativeDecoder.applies`) to a dense Qwen3 LLM without attention biases, fp32 on CPU with
q/k/v and gate/up fused, where a C compiler builds the kernel. Products read the bf16 copies when
every one of them is current (`bf16_copies_`), else the fp32 weights.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from internvl35.kernels.build import load_kernel
from internvl35.models.layers import FusedLinears, Linear, WeightCopy, rope_cos_sin

_PP = ctypes.POINTER(ctypes.c_void_p)
_PRODUCTS = ("qkv", "o", "gate_up", "down")


class _Plan(ctypes.Structure):
    """Mirrors `Plan` in decode_step.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("hidden", "heads", "kv_heads", "head_dim", "inter", "vocab",
                                               "layers", "slots", "bf16")]
                + [("eps", ctypes.c_double)]
                + [(n, _PP) for n in (*_PRODUCTS, "in_norm", "post_norm", "q_norm", "k_norm", "k_cache", "v_cache")]
                + [(n, ctypes.c_void_p) for n in ("final_norm", "embed", "cos", "sin", "head", "h", "qkv_out",
                                                  "attn", "act", "local")])


def _products(model: nn.Module) -> dict[str, list[tuple[torch.Tensor, WeightCopy | None]]]:
    """Per product kind, every layer's (fp32 weight, its current bf16 copy or None); the head as one."""
    lm = model.language_model
    attn = [m.self_attn for m in lm.model.layers]
    mlp = [m.mlp for m in lm.model.layers]

    def pair(f: FusedLinears | Linear) -> tuple[torch.Tensor, WeightCopy | None]:
        if isinstance(f, FusedLinears):
            return f._buffer("weight"), f._current(f.half)
        return f.weight, f.half

    return {"qkv": [pair(m.qkv) for m in attn], "o": [pair(m.o_proj) for m in attn],
            "gate_up": [pair(m.gate_up) for m in mlp], "down": [pair(m.down_proj) for m in mlp],
            "head": [(lm.head_weight, lm.head_half)]}


def _fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


class NativeDecoder:
    """One decode step per call for a single sequence, written into `cache` (made with
    `v_transposed=False`); holds every tensor its plan points into."""

    def __init__(self, model: nn.Module, cache) -> None:
        lm, t = model.language_model, model.cfg.text
        slots, threads = cache.k[0].shape[2], torch.get_num_threads()
        if cache.valid.shape[0] != 1 or cache.v_transposed:
            raise ValueError("the native step needs a one-row cache with V stored untransposed")
        products = _products(model)
        copies = {k: [c.get(w) if c is not None else None for w, c in v] for k, v in products.items()}
        bf16 = all(x is not None for v in copies.values() for x in v)
        weights = copies if bf16 else {k: [w for w, _ in v] for k, v in products.items()}
        layers = lm.model.layers
        cos, sin = rope_cos_sin(torch.arange(slots)[None], t.head_dim, t.rope_theta, torch.float32)
        group = t.num_heads // t.num_kv_heads
        scratch = {"h": t.hidden_size, "qkv_out": (t.num_heads + 2 * t.num_kv_heads) * t.head_dim,
                   "attn": t.num_heads * t.head_dim, "act": t.intermediate_size,
                   "local": threads * (t.hidden_size + group * slots)}  # per thread: normed input, scores
        self._keep: list = []  # everything the plan points into lives as long as the plan
        self._plan = _Plan(hidden=t.hidden_size, heads=t.num_heads, kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                           inter=t.intermediate_size, vocab=lm.head_weight.shape[0], layers=len(layers),
                           slots=slots, bf16=int(bf16), eps=t.rms_norm_eps)
        per_layer = {k: weights[k] for k in _PRODUCTS} | {
            "in_norm": [m.input_layernorm.weight for m in layers],
            "post_norm": [m.post_attention_layernorm.weight for m in layers],
            "q_norm": [m.self_attn.q_norm.weight for m in layers],
            "k_norm": [m.self_attn.k_norm.weight for m in layers], "k_cache": cache.k, "v_cache": cache.v}
        for name, tensors in per_layer.items():
            array = (ctypes.c_void_p * len(tensors))(*[x.data_ptr() for x in tensors])
            self._keep += [array, *tensors]
            setattr(self._plan, name, ctypes.cast(array, _PP))
        single = {"final_norm": lm.model.norm.weight, "embed": lm.model.embed_tokens.weight, "cos": cos[0],
                  "sin": sin[0], "head": weights["head"][0]} | {k: torch.zeros(n) for k, n in scratch.items()}
        for name, tensor in single.items():
            self._keep.append(tensor)
            setattr(self._plan, name, tensor.data_ptr())
        self._threads, self.bf16 = threads, bf16
        self._fn = load_kernel("decode_step").decode_step
        self._fn.argtypes = [ctypes.POINTER(_Plan), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        self._fn.restype = None

    def __call__(self, token: int, slot: int) -> torch.Tensor:
        """Logits [vocab] for `token` at cache slot `slot` (its position: one unpadded row); writes its K/V there."""
        logits = torch.empty(self._plan.vocab)
        self._fn(ctypes.byref(self._plan), token, slot, logits.data_ptr(), self._threads)
        return logits

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether the native step covers `model` (an InternVLModel) here, building the kernel if needed."""
        t, lm = model.cfg.text, model.language_model
        if t.moe or t.attention_bias or t.num_heads % t.num_kv_heads:
            return False
        layers = list(lm.model.layers)
        fused = [f for m in layers for f in (m.self_attn.qkv, m.mlp.gate_up)]
        if not all(isinstance(f, FusedLinears) and f.fused() for f in fused):
            return False
        params = [w for v in _products(model).values() for w, _ in v] + [lm.model.embed_tokens.weight, lm.model.norm.weight] + [
            p for m in layers for p in (m.input_layernorm.weight, m.post_attention_layernorm.weight,
                                        m.self_attn.q_norm.weight, m.self_attn.k_norm.weight)]
        return all(_fp32_cpu(p) for p in params) and load_kernel("decode_step") is not None
