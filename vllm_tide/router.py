"""The router: a tiny MLP that scores whether a token's hidden state has converged.

Shared verbatim by calibration (training) and the plugin (inference), so both see exactly the
same function of exactly the same input (see ``router_input``).
"""
from __future__ import annotations

import torch
from torch import nn

ROUTER_INPUT = "final_norm(residual stream after checkpoint layer)"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as vLLM's and HF's Llama-family norms do."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def norm_weight_eps(norm) -> tuple[torch.Tensor, float]:
    """(the weight an RMSNorm module multiplies by, its eps), for vLLM's and HF's norm modules alike.
    Gemma's norms (vLLM's GemmaRMSNorm, HF's Gemma3RMSNorm) store w and multiply by 1 + w."""
    w = norm.weight.data
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    return (1.0 + w.float()).to(w.dtype) if type(norm).__name__.startswith("Gemma") else w, eps


def router_input(residual_stream: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What a router sees: the model's own final norm applied to the full residual-stream state.

    In vLLM's fused-residual form that state is ``hidden_states + residual``; in HF it is the
    decoder layer's output. Never the already-normed final state (the reference code's trap).
    """
    return rms_norm(residual_stream, norm_weight, eps)


class Router(nn.Module):
    """hidden -> bottleneck -> 1 with SiLU and a sigmoid (the paper's router)."""

    def __init__(self, hidden_size: int, bottleneck: int = 128):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, 1)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.silu(self.down(z))).squeeze(-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))
