"""TIDE's exits, simulated on a Hugging Face model with K/V propagation (no vLLM needed).

The spec: a token exits at the first checkpoint >= min_layer whose router scores > threshold on
final_norm(its residual stream). From then on its residual stream is frozen, so every deeper layer
computes its K/V for that token from the frozen state (through the layer's own norm and
projections), and its output is final_norm(frozen) -> exit projection -> LM head.

One causal forward over a whole sequence with the frozen rows restored after every layer gives, at
every position, exactly what the plugin computes token by token; calibration uses it to choose the
operating point with propagation; the tests check it against their own independent reference
(tests/reference.py), as they check the plugin.

Calibration measures dozens of points on the same sequences, and below a point's first active
checkpoint nothing differs from the full model: ``full_pass`` records the full model's pass once per
sequence, and ``ExitSimulator.run_from`` runs only the layers from that checkpoint on.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from .router import Router, norm_weight_eps, router_input


class ExitSimulator:
    def __init__(self, hf_model, routers: dict[int, Router], projections: dict, threshold: float, min_layer: int):
        self.hf = hf_model
        self.device = hf_model.model.norm.weight.device
        self.routers, self.projections = on_model_device(
            hf_model, {c: r for c, r in routers.items() if c >= min_layer}, projections)
        self.threshold = threshold

    @classmethod
    def from_checkpoint(cls, hf_model, ckpt, threshold: float, min_layer: int) -> "ExitSimulator":
        routers = {c: ckpt.router_module(c).eval() for c in ckpt.layers}
        return cls(hf_model, routers, ckpt.projections, threshold, min_layer)

    @torch.no_grad()
    def run(self, ids: list[int], capture_inputs: bool = False):
        """(logits [T, V] fp32, exit layer per token [-1: none], layer inputs {layer: [T, D]} if asked)."""
        inputs = {}

        def pre_hook(li):
            def fn(_m, args, kwargs):
                inputs[li] = (args[0] if args else kwargs["hidden_states"])[0].clone()
            return fn

        layers = self.hf.model.layers
        extra = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                 for i, layer in enumerate(layers)] if capture_inputs else []
        try:
            with self._exits(len(ids)) as exit_at:
                hidden = self.hf.model(torch.tensor([ids], device=self.device)).last_hidden_state[0]
        finally:
            for h in extra:
                h.remove()
        logits = self._logits(hidden, exit_at)
        return logits, exit_at, inputs

    @torch.no_grad()
    def run_from(self, prefix: "Prefix", start: int, rows_from: int = 0):
        """run()'s (logits, exit layers) for the sequence ``prefix`` holds, computing only layers start..
        from its recorded input to ``start``: the same result when no router below ``start`` is active
        (the layers before a point's minimum exit layer are the full model's). Logits only for positions
        ``rows_from``.. (calibration counts only answer tokens of a prompt + answer)."""
        assert all(c >= start for c in self.routers), "a router below the start layer would be skipped"
        layers = self.hf.model.layers
        h = prefix.inputs[start]
        with self._exits(h.shape[1]) as exit_at:
            for li in range(start, len(layers)):
                args, kwargs = prefix.calls[li]
                out = layers[li](h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
        hidden = self.hf.model.norm(h)[0]
        return self._logits(hidden[rows_from:], exit_at[rows_from:]), exit_at

    def _logits(self, hidden: torch.Tensor, exit_at: torch.Tensor) -> torch.Tensor:
        """Each exited row through its checkpoint's exit projection, then the LM head, in fp32."""
        hidden = hidden.float()
        for c, proj in self.projections.items():
            rows = exit_at == c
            if rows.any():
                hidden[rows] = proj.apply(hidden[rows])
        return lm_logits(self.hf, hidden)

    def _hold_exited(self, h: torch.Tensor, layer: int, done: torch.Tensor, frozen: torch.Tensor,
                     exit_at: torch.Tensor) -> None:
        """Set the exited rows of ``layer``'s output (the next layer's input) to their frozen state."""
        h[done] = frozen[done]

    @contextlib.contextmanager
    def _exits(self, t: int):
        """Hooks on every decoder layer that apply the exits while the layers run; yields the exit layer
        per token (-1: none), filled in as they run."""
        norm = self.hf.model.norm
        exit_at = torch.full((t,), -1, device=self.device)
        frozen = torch.zeros(t, self.hf.config.hidden_size, dtype=norm.weight.dtype, device=self.device)

        def hook(li):
            def fn(_m, _inp, out):
                h = out[0] if isinstance(out, tuple) else out
                done = exit_at >= 0
                if done.any() or li in self.routers:
                    h = h.clone()
                    self._hold_exited(h[0], li, done, frozen, exit_at)
                if li in self.routers:
                    z = router_input(h[0], *norm_weight_eps(norm)).float()
                    new = (self.routers[li](z) > self.threshold) & ~done
                    frozen[new] = h[0, new]
                    exit_at[new] = li
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return fn

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(self.hf.model.layers)]
        try:
            yield exit_at
        finally:
            for h in handles:
                h.remove()


def on_model_device(hf_model, routers: dict[int, Router], projections: dict) -> tuple[dict, dict]:
    """Routers and (non-identity) projections where the model is, since everything the exits touch
    lives there (routers are trained on the CPU): each one itself when it is there already, else a copy,
    so the caller's stay put. Callers that simulate many points move them once."""
    device = hf_model.model.norm.weight.device

    def on(router: Router) -> Router:
        return router if next(router.parameters()).device == device else copy.deepcopy(router).to(device)
    return ({c: on(r) for c, r in routers.items()},
            {c: p.to(device) for c, p in projections.items() if p is not None})


@dataclass
class Prefix:
    """One sequence's pass through the full model (no exits), kept so that exit simulations can start
    at a checkpoint instead of layer 0: the input to each of ``starts`` layers, and how every layer from
    the first of them on was called (attention mask, rotary embeddings, ...)."""
    inputs: dict[int, torch.Tensor]      # layer -> its input hidden states [1, T, D]
    calls: dict[int, tuple]              # layer -> (positional args after the hidden states, keyword args)


@torch.no_grad()
def full_pass(hf_model, ids: list[int], starts: list[int], rows_from: int = 0) -> tuple[Prefix, torch.Tensor]:
    """The full model on ``ids``: (its Prefix, its logits [T - rows_from, V] fp32 for positions rows_from..,
    as ExitSimulator without routers gives)."""
    layers = hf_model.model.layers
    first = min(starts, default=len(layers))
    inputs, calls = {}, {}

    def pre_hook(li):
        def fn(_m, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if li in starts:
                inputs[li] = h.clone()
            calls[li] = (tuple(args[1:]), kwargs)
        return fn

    handles = [layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(first, len(layers))]
    try:
        # no K/V cache: replayed layers must attend over this sequence's keys only, not append to a cache
        hidden = hf_model.model(torch.tensor([ids], device=hf_model.model.norm.weight.device),
                                use_cache=False).last_hidden_state[0]
    finally:
        for h in handles:
            h.remove()
    return Prefix(inputs, calls), lm_logits(hf_model, hidden[rows_from:])


def lm_logits(hf_model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in fp32: the full model's logits and every point's are computed alike, so their
    numerics cancel when calibration compares them."""
    return hidden.float() @ lm_head_weight(hf_model).float().T


def lm_head_weight(hf_model) -> torch.Tensor:
    """The LM head's weight as the logits use it: Granite divides its logits by logits_scaling, which
    is the same as dividing the (bias-free) head's weight."""
    w = hf_model.get_output_embeddings().weight.detach()
    scaling = float(getattr(hf_model.config, "logits_scaling", 1.0) or 1.0)
    return w if scaling == 1.0 else w / scaling
