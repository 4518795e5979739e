"""TIDE's exits, simulated on a Hugging Face model with K/V propagation (no vLLM needed).

The spec: a token exits at the first checkpoint >= min_layer whose router scores > threshold on
final_norm(its residual stream). From then on its residual stream is frozen, so every deeper layer
computes its K/V for that token from the frozen state (through the layer's own norm and
projections), and its output is final_norm(frozen) -> exit projection -> LM head.

One causal forward over a whole sequence with the frozen rows restored after every layer gives, at
every position, exactly what the plugin computes token by token; calibration uses it to choose the
operating point with propagation, and the tests use it as the reference for the plugin.
"""
from __future__ import annotations

import torch

from .router import Router, router_input


class ExitSimulator:
    def __init__(self, hf_model, routers: dict[int, Router], projections: dict, threshold: float, min_layer: int):
        self.hf = hf_model
        self.routers = {c: r for c, r in routers.items() if c >= min_layer}
        self.projections = projections
        self.threshold = threshold

    @classmethod
    def from_checkpoint(cls, hf_model, ckpt, threshold: float, min_layer: int) -> "ExitSimulator":
        routers = {c: ckpt.router_module(c).eval() for c in ckpt.layers}
        return cls(hf_model, routers, ckpt.projections, threshold, min_layer)

    @torch.no_grad()
    def run(self, ids: list[int], capture_inputs: bool = False):
        """(logits [T, V] fp32, exit layer per token [-1: none], layer inputs {layer: [T, D]} if asked)."""
        hf = self.hf
        norm = hf.model.norm
        t = len(ids)
        exit_at = torch.full((t,), -1)
        frozen = torch.zeros(t, hf.config.hidden_size, dtype=norm.weight.dtype)
        inputs = {}

        def hook(li):
            def fn(_m, _inp, out):
                h = out[0] if isinstance(out, tuple) else out
                done = exit_at >= 0
                if done.any() or li in self.routers:
                    h = h.clone()
                    h[0, done] = frozen[done]
                if li in self.routers:
                    z = router_input(h[0], norm.weight, norm.variance_epsilon).float()
                    new = (self.routers[li](z) > self.threshold) & ~done
                    frozen[new] = h[0, new]
                    exit_at[new] = li
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return fn

        def pre_hook(li):
            def fn(_m, args, kwargs):
                inputs[li] = (args[0] if args else kwargs["hidden_states"])[0].clone()
            return fn

        layers = hf.model.layers
        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        if capture_inputs:
            handles += [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            hidden = hf.model(torch.tensor([ids], device=norm.weight.device)).last_hidden_state[0].float()
        finally:
            for h in handles:
                h.remove()
        for c, proj in self.projections.items():
            rows = exit_at == c
            if rows.any():
                hidden[rows] = proj.apply(hidden[rows])
        logits = hidden @ hf.get_output_embeddings().weight.float().T
        return logits, exit_at, inputs
