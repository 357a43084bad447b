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
from internvl35.models.layers import FusedLinears, rope_cos_sin
from internvl35.models.weight_copies import current_copy

_PP = ctypes.POINTER(ctypes.c_void_p)
MAX_THREADS = 64  # decode_step.c's MAX_THREADS: its slots for the threads' argmax results


class _Plan(ctypes.Structure):
    """Mirrors `Plan` in decode_step.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("hidden", "heads", "kv_heads", "head_dim", "inter", "vocab",
                                               "layers", "slots", "bf16")]
                + [("eps", ctypes.c_double)]
                + [(n, _PP) for n in ("qkv", "o", "gate_up", "down", "in_norm", "post_norm", "q_norm", "k_norm",
                                      "k_cache", "v_cache")]
                + [(n, ctypes.c_void_p) for n in ("final_norm", "embed", "cos", "sin", "head", "h", "qkv_out",
                                                  "attn", "act", "local")])


def _weights(model: nn.Module, bf16: bool) -> dict[str, list[torch.Tensor | None]]:
    """Every layer's fused q|k|v, o, fused gate|up and down weight, and the head (a list of one):
    the fp32 weights, or with `bf16` their current bf16 copies (None where a copy is missing or stale)."""
    lm = model.language_model
    attn, mlp = [m.self_attn for m in lm.model.layers], [m.mlp for m in lm.model.layers]
    products = {"qkv": [m.qkv for m in attn], "o": [m.o_proj for m in attn],
                "gate_up": [m.gate_up for m in mlp], "down": [m.down_proj for m in mlp]}
    out = {k: [f.bf16_now() if bf16 else f.weight_now() for f in fs] for k, fs in products.items()}
    out["head"] = [current_copy(lm.head_half, lm.head_weight) if bf16 else lm.head_weight]
    return out


def _norms(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    layers = model.language_model.model.layers
    return {"in_norm": [m.input_layernorm.weight for m in layers],
            "post_norm": [m.post_attention_layernorm.weight for m in layers],
            "q_norm": [m.self_attn.q_norm.weight for m in layers],
            "k_norm": [m.self_attn.k_norm.weight for m in layers]}


class NativeDecoder:
    """One decode step per call for a single sequence, written into `cache` (made with
    `v_transposed=False`); holds every tensor its plan points into."""

    def __init__(self, model: nn.Module, cache) -> None:
        if cache.valid.shape[0] != 1 or cache.v_transposed:
            raise ValueError("the native step needs a one-row cache with V stored untransposed")
        lm, t = model.language_model, model.cfg.text
        self.slots, self._threads = cache.k[0].shape[2], torch.get_num_threads()
        half = _weights(model, bf16=True)
        self.bf16 = all(x is not None for v in half.values() for x in v)
        weights = half if self.bf16 else _weights(model, bf16=False)
        self._keep: list = []  # everything the plan points into lives as long as the plan
        self._plan = _Plan(hidden=t.hidden_size, heads=t.num_heads, kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                           inter=t.intermediate_size, vocab=lm.head_weight.shape[0], layers=t.num_layers,
                           slots=self.slots, bf16=int(self.bf16), eps=t.rms_norm_eps)
        for name, tensors in ({k: v for k, v in weights.items() if k != "head"} | _norms(model)
                              | {"k_cache": cache.k, "v_cache": cache.v}).items():
            array = (ctypes.c_void_p * len(tensors))(*[x.data_ptr() for x in tensors])
            self._keep += [array, *tensors]
            setattr(self._plan, name, ctypes.cast(array, _PP))
        cos, sin = rope_cos_sin(torch.arange(self.slots)[None], t.head_dim, t.rope_theta, torch.float32)
        group = t.num_heads // t.num_kv_heads
        scratch = {"h": t.hidden_size, "qkv_out": (t.num_heads + 2 * t.num_kv_heads) * t.head_dim,
                   "attn": t.num_heads * t.head_dim, "act": t.intermediate_size,
                   "local": self._threads * (t.hidden_size + group * self.slots)}  # per thread: normed input, scores
        for name, tensor in ({"final_norm": lm.model.norm.weight, "embed": lm.model.embed_tokens.weight,
                              "cos": cos[0], "sin": sin[0], "head": weights["head"][0]}
                             | {k: torch.zeros(n) for k, n in scratch.items()}).items():
            self._keep.append(tensor)
            setattr(self._plan, name, tensor.data_ptr())
        self.vocab, self._embed_rows = self._plan.vocab, lm.model.embed_tokens.weight.shape[0]
        lib = load_kernel("decode_step")
        lib.plan_bytes.restype = ctypes.c_int64
        if lib.plan_bytes() != ctypes.sizeof(_Plan):  # the C struct and its mirror here must agree
            raise RuntimeError(f"decode_step.c's Plan has {lib.plan_bytes()} bytes, _Plan {ctypes.sizeof(_Plan)}")
        self._fn = lib.decode_step
        self._fn.argtypes = [ctypes.POINTER(_Plan), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        self._fn.restype = ctypes.c_int64

    def __call__(self, token: int, slot: int) -> tuple[torch.Tensor, int]:
        """(logits [vocab], their argmax) for `token` at cache slot `slot` (its position: one unpadded
        row); writes its K/V there."""
        if not (0 <= token < self._embed_rows and 0 <= slot < self.slots):
            raise IndexError(f"token {token} or slot {slot} out of range ({self._embed_rows} ids, {self.slots} slots)")
        logits = torch.empty(self.vocab)
        return logits, self._fn(ctypes.byref(self._plan), token, slot, logits.data_ptr(), self._threads)

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether the native step covers `model` (an InternVLModel) here, building the kernel if needed."""
        t, lm = model.cfg.text, model.language_model
        if t.moe or t.attention_bias or t.num_heads % t.num_kv_heads or torch.get_num_threads() > MAX_THREADS:
            return False
        fused = [f for m in lm.model.layers for f in (m.self_attn.qkv, m.mlp.gate_up)]
        if not all(isinstance(f, FusedLinears) and f.fused() for f in fused):
            return False
        params = [w for ws in (*_weights(model, bf16=False).values(), *_norms(model).values()) for w in ws]
        params += [lm.model.embed_tokens.weight, lm.model.norm.weight]
        return all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in params) and (
            load_kernel("decode_step") is not None)
