"""fp32 linear layers through oneDNN on the CPU, where it is measurably faster than the default BLAS.

PyTorch computes an fp32 `nn.Linear` with MKL on x86. On a 2-core AMD EPYC with AVX-512 (torch
2.13.0), oneDNN, which PyTorch also bundles, multiplied the same fp32 matrices about 2x faster for
prompt-sized inputs and 1.4x faster for a batch of 8 decode rows (one thread, micro-benchmark of the
base model's layer shapes). oneDNN rounds differently in the last bits, about 1e-5 on these layers.
So it is switched on only where a probe finds it faster, and its greedy outputs are compared with
the default kernel's by `benchmarks/generation.py` (docs/benchmarks.md, "Generation speed").

Only inference goes through oneDNN: with gradients enabled the layer falls back to `F.linear`, whose
backward pass PyTorch defines.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_onednn_fast: bool | None = None


class OneDNNLinear(torch.nn.Linear):
    """An `nn.Linear` whose fp32 CPU inference runs through oneDNN; weights and state dict are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_is_faster() -> bool:
    """Time fp32 products of a decode shape (1 row) and a prompt shape (128 rows) with both kernels.

    oneDNN is chosen when it is at least 10% faster on the prompt shape and no more than 10% slower
    on the decode shape. Each kernel keeps its best of five interleaved rounds, so a burst of load
    from other processes does not decide the outcome.
    """
    global _onednn_fast
    if _onednn_fast is None:
        if not onednn_available():
            _onednn_fast = False
            return False
        weight = torch.randn(2048, 1024)
        kernels = {
            "default": lambda x: F.linear(x, weight),
            "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
        }
        ratios = {}
        with torch.inference_mode():
            for shape, rows in (("decode", 1), ("prompt", 128)):
                x = torch.randn(rows, 1024)
                best = {name: float("inf") for name in kernels}
                for kernel in kernels.values():
                    kernel(x)
                for _ in range(5):
                    for name, kernel in kernels.items():
                        start = time.perf_counter()
                        for _ in range(3):
                            kernel(x)
                        best[name] = min(best[name], time.perf_counter() - start)
                ratios[shape] = best["onednn"] / best["default"]
        _onednn_fast = ratios["prompt"] < 0.9 and ratios["decode"] < 1.1
        logger.info(
            "oneDNN/default fp32 linear time ratio: decode %.2f, prompt %.2f -> %s",
            ratios["decode"], ratios["prompt"], "oneDNN" if _onednn_fast else "default kernel",
        )
    return _onednn_fast


def use_onednn(model: torch.nn.Module, enabled: bool = True) -> int:
    """Switch every plain `nn.Linear` of `model` to `OneDNNLinear` (or back); returns how many changed.

    The class of each module is swapped in place, so weights, tied weights (the LM head shares the
    embedding matrix) and hooks stay as they are, and PEFT still recognises the layers as linear.
    The small matrices of loaded LoRA adapters (`lora_A`, `lora_B`) are left alone.
    """
    source, target = (torch.nn.Linear, OneDNNLinear) if enabled else (OneDNNLinear, torch.nn.Linear)
    changed = 0
    for name, module in model.named_modules():
        if type(module) is source and not any(part.startswith("lora_") for part in name.split(".")):
            module.__class__ = target
            changed += 1
    return changed


def uses_onednn(model: torch.nn.Module) -> bool:
    return any(type(module) is OneDNNLinear for module in model.modules())
