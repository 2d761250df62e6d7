"""A decoder layer's element-wise ops as torch ops: the torch path of
inference.llama's layer stack, and what inference.kernels' fused ops
(csrc/fused_ops.cpp) are checked against. Its own module so that both can
import it (llama imports kernels). TorchScript compiles these functions into
the scripted layer stack."""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF's LlamaRMSNorm op for op: statistics in fp32, scaled after casting back.
    # F.rms_norm is no single kernel on CPU (its fallback runs pow, sum, div,
    # where, add...): at one row it took ~30 us a call, and a step has 61 of
    # them; these five ops were 0.7-0.9 ms a one-row step faster (int4 weights,
    # 2-core Xeon, docs/BENCHMARKS.md) and are HF's own sums.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, D]; cos [T, 1, D] holds each frequency twice (HF's layout);
    # signed_sin is sin with its first half negated, so HF's rotate_half(x) * sin
    # is the two halves of x swapped (one flip) times signed_sin: three ops, not seven.
    t, heads, dim = x.size(0), x.size(1), x.size(2)
    swapped = x.view(t, heads, 2, dim // 2).flip(2).view(t, heads, dim)  # [x2, x1]
    return torch.addcmul(x * cos, swapped, signed_sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up [T, 2 * I]: the fused gate/up matmul's output, gate first.
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
