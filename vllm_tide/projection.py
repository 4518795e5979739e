"""Exit projections: how an exited token's final-normed state is mapped before the LM head.

One class serves calibration (fitting, labels) and the plugin (inference), so both compute the same
function from the same stored tensors:

- ``identity``: nothing.
- ``temperature``: h / T. The LM heads of the supported families are bias-free linear maps, so
  scaling the state by 1/T is exactly scaling the exit logits by 1/T.
- ``affine``: (W h + b) / T, W full [D, D] or low-rank (W = I + U V) for large models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROJECTIONS = ("identity", "temperature", "affine")


@dataclass
class ExitProjection:
    weight: torch.Tensor | None = None       # [D, D] (full affine)
    u: torch.Tensor | None = None            # [D, r] (low-rank affine: W = I + u @ v)
    v: torch.Tensor | None = None            # [r, D]
    bias: torch.Tensor | None = None         # [D]
    temperature: float = 1.0

    def __post_init__(self):
        # stored as fp32 in the checkpoint; round here so calibration and inference use the same value
        self.temperature = float(torch.tensor(float(self.temperature), dtype=torch.float32))

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """Project rows of h in fp32; returns fp32."""
        y = h.float()
        if self.weight is not None:
            y = torch.nn.functional.linear(y, self.weight, self.bias)
        else:
            if self.u is not None:
                y = y + (y @ self.v.T) @ self.u.T
            if self.bias is not None:
                y = y + self.bias
        if self.temperature != 1.0:
            y = y / self.temperature
        return y

    def to(self, device) -> "ExitProjection":
        move = lambda t: None if t is None else t.float().to(device)  # noqa: E731
        return ExitProjection(move(self.weight), move(self.u), move(self.v), move(self.bias), self.temperature)

    # ---------------------------------------------------------------- storage in the router checkpoint
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ("weight", "u", "v", "bias") if getattr(self, k) is not None}
        out["temperature"] = torch.tensor([float(self.temperature)])
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "ExitProjection":
        temp = t.get("temperature")
        return cls(weight=t.get("weight"), u=t.get("u"), v=t.get("v"), bias=t.get("bias"),
                   temperature=1.0 if temp is None else float(temp.reshape(-1)[0]))

    def check(self, hidden_size: int) -> str | None:
        """What is wrong with the shapes, or None."""
        d = hidden_size
        if self.weight is not None and tuple(self.weight.shape) != (d, d):
            return f"weight has shape {tuple(self.weight.shape)}, expected {(d, d)}"
        if (self.u is None) != (self.v is None):
            return "a low-rank projection needs both u and v"
        if self.u is not None and (self.u.shape[0] != d or self.v.shape[1] != d or self.u.shape[1] != self.v.shape[0]):
            return f"low-rank factors have shapes {tuple(self.u.shape)} and {tuple(self.v.shape)} for hidden size {d}"
        if self.bias is not None and tuple(self.bias.shape) != (d,):
            return f"bias has shape {tuple(self.bias.shape)}, expected {(d,)}"
        if not (self.temperature > 0 and self.temperature < float("inf")):
            return f"temperature is {self.temperature}, expected a positive number"
        return None


# -------------------------------------------------------------------------------- fitting (calibration)

# Rows per elementwise block on a CPU: a block's softmax temporaries stay in cache, which makes
# log-softmax, KL and the temperature fit about 4x faster than over a whole chunk.
CPU_BLOCK = 64


def row_blocks(n: int, device) -> list[tuple[int, int]]:
    """(start, end) row blocks: CPU_BLOCK rows on a CPU, all rows at once elsewhere."""
    step = CPU_BLOCK if torch.device(device).type == "cpu" else max(n, 1)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def fit_affine(z: torch.Tensor, target: torch.Tensor, ridge: float, rank: int | None = None) -> ExitProjection:
    """Ridge least squares from the exit's normed state to the final normed state (tuned-lens style).
    With ``rank``, the correction W - I is truncated to that rank (stored as two thin factors)."""
    x = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], 1)
    a = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, x.T @ target.double())          # [D+1, D]
    weight, bias = w[:-1].T, w[-1]
    if rank is None or rank >= weight.shape[0]:
        return ExitProjection(weight=weight.float().contiguous(), bias=bias.float().contiguous())
    uu, s, vh = torch.linalg.svd(weight - torch.eye(weight.shape[0], dtype=torch.float64))
    return ExitProjection(u=(uu[:, :rank] * s[:rank]).float().contiguous(), v=vh[:rank].float().contiguous(),
                          bias=bias.float().contiguous())


@torch.no_grad()
def fit_temperature(exit_logits: torch.Tensor, final_logp: torch.Tensor, iters: int = 50, tol: float = 1e-7) -> float:
    """The T in [e^-3, e^3] minimising mean KL(final || softmax(exit_logits / T)).

    In b = 1/T the objective, mean(logsumexp(b l)) - b mean(E_final[l]) + const, is convex: its
    derivative mean(E_q[l]) - mean(E_final[l]) (q = softmax(b l)) rises with b, at the rate
    mean(Var_q[l]). So Newton steps on that derivative, kept inside a shrinking bracket, find the
    minimum in a handful of passes over the logits.
    """
    logits = exit_logits.float()
    blocks = [slice(s, e) for s, e in row_blocks(len(logits), logits.device)]
    target = sum((final_logp[r].float().exp() * logits[r]).sum().item() for r in blocks) / len(logits)

    def slope(b: float) -> tuple[float, float]:
        mean_sum = var_sum = 0.0
        for r in blocks:
            lr = logits[r]
            ql = torch.softmax(lr * b, -1) * lr
            mean = ql.sum(-1)
            mean_sum += mean.sum().item()
            var_sum += ((ql * lr).sum(-1) - mean * mean).sum().item()
        return mean_sum / len(logits) - target, var_sum / len(logits)

    lo, hi = math.exp(-3.0), math.exp(3.0)
    if slope(lo)[0] >= 0:       # the objective rises from the smallest b on: the largest T
        return 1.0 / lo
    if slope(hi)[0] <= 0:
        return 1.0 / hi
    b = 1.0
    for _ in range(iters):
        g, curvature = slope(b)
        if g == 0:
            break
        lo, hi = (lo, b) if g > 0 else (b, hi)
        step = b - g / curvature if curvature > 0 else None
        new = step if step is not None and lo <= step <= hi else (lo + hi) / 2
        if abs(new - b) <= tol * b:
            b = new
            break
        b = new
    return 1.0 / b
