"""Copies of a weight kept for inference in another form: packed for oneDNN (products of a few
rows) and bf16 (single-row products of bf16-valued weights), each invalidated when its weight
changes."""

from __future__ import annotations

import torch

from internvl35.models.cpu_matmul import onednn_product


def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return onednn_product(x, w, bias)


_packed_op = None  # `onednn_linear` as an operator compiled graphs call as is (see PackedWeight)


def _register_packed_op() -> None:
    """Inductor lowers oneDNN's own op only for weights frozen into the graph, so compiled steps call
    the packed product through an operator of ours (registered once, with the first packed weight)."""
    global _packed_op
    if _packed_op is None:
        _packed_op = torch.library.custom_op("internvl35::packed_linear", mutates_args=())(onednn_linear)
        _packed_op.register_fake(lambda x, w, bias: x.new_empty((*x.shape[:-1], w.shape[0])))


def packed_op():
    """The operator compiled graphs call for a packed product (registered with the first PackedWeight)."""
    return _packed_op


class WeightCopy:
    """A copy of a weight kept for inference in another form. `get` returns None once the weight it
    was made from has been replaced or modified in place (version counter)."""

    members: tuple[int, ...] = ()  # version counters of the fused modules it covers (FusedLinears)

    def __init__(self, tensor: torch.Tensor, weight: torch.Tensor) -> None:
        self.tensor, self._source = tensor, self._key(weight)

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), weight._version, tuple(weight.shape)

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling():  # a compiled caller checks `current` eagerly first
            return self.tensor
        return self.tensor if self.current(weight) else None

    def current(self, weight: torch.Tensor) -> bool:
        return self._key(weight) == self._source


def current_copy(copy: WeightCopy | None, weight: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor of `copy` if there is one and it still matches `weight`, else None."""
    return copy.get(weight) if copy is not None and weight is not None else None


class PackedWeight(WeightCopy):
    """A copy of a [N, K] fp32 CPU weight in oneDNN's blocked layout, for products of a few rows
    (decode steps), where MKL on the plain layout pays nearly per row. Measured on 2 cores, 1B
    shapes, one layer's products: 13.6 / 16.2 / 21.5 / 46.4 ms at 2 / 4 / 8 / 32 rows vs 21.6 /
    25.4 / 29.2 / 62.7 ms (the thread split of `layers.linear`), equal at 1 and 456 rows; at 640+ rows it is
    6-8% slower, so prefills keep the plain weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        _register_packed_op()
        super().__init__(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8), weight)  # 8: a row-count hint

    @classmethod
    def of(cls, weight: torch.Tensor) -> PackedWeight | None:
        """A copy of `weight` if it is an fp32 CPU weight and oneDNN is there, else None."""
        return cls(weight) if packable(weight) else None


class Bf16Weight(WeightCopy):
    """A bfloat16 copy of an fp32 weight whose every value is a bfloat16 (true of all released
    checkpoints, which store bf16), for single-row products in compiled decode steps and the native
    step (`internvl35.kernels`): they read half the bytes and widen each value exactly, so the
    product is the fp32 product.
    Decode is bound by reading weights: 1B gate/up matvecs on 2 cores, 28 distinct weights, took
    466-529 us vs 831-1088 us from the fp32 weight (1.6-2.2x). Costs half the weight's fp32 size."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight.detach().to(torch.bfloat16), weight)

    @classmethod
    def of(cls, weight: torch.Tensor) -> Bf16Weight | None:
        """A copy of `weight` if it is a CPU fp32 weight holding only bf16 values, else None."""
        return cls(weight) if weight.device.type == "cpu" and bf16_exact(weight) else None


def bf16_exact(weight: torch.Tensor) -> bool:
    """Whether every value of an fp32 tensor is a bfloat16 (its low 16 bits are zero), in chunks so
    that a vocabulary-sized head needs no full-size temporary."""
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        return False
    bits = weight.detach().reshape(-1).view(torch.int32)
    return not any(bool((chunk & 0xFFFF).any()) for chunk in bits.split(1 << 22))


def packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
