"""Test fixtures that need no vLLM: tiny HF models, synthetic routers, and an independent reference
of the TIDE spec written directly on HF transformers (not by calling the plugin)."""
from __future__ import annotations

import os
import shutil

import torch

from vllm_tide.checkpoint import RouterCheckpoint, checkpoint_layers
from vllm_tide.fingerprint import model_identity
from vllm_tide.router import Router, router_input

TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False}),
}


def make_tiny_model(family: str, out_dir: str, tokenizer_dir: str, num_layers: int = 8, seed: int = 0) -> str:
    """A small random-weight model of a family, saved with the default model's tokenizer."""
    import transformers
    cfg_name, model_name, extra = TINY[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-6, **extra)
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():   # larger than init-scale weights, so layers change the residual stream visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in os.listdir(tokenizer_dir):
        if f.startswith("tokenizer") or f.endswith(".jinja"):
            shutil.copy(os.path.join(tokenizer_dir, f), out_dir)
    return out_dir


def synthetic_router(model_dir: str, path: str, fire_at: dict[int, str], interval: int = 4, seed: int = 0,
                     projection: str = "identity", threshold: float = 0.5, min_layer: int = 0) -> RouterCheckpoint:
    """Routers built to fire on purpose: fire_at maps a checkpoint to "all" (every token exits there),
    or "some" (a random direction splits tokens); other checkpoints never fire."""
    ident = model_identity(model_dir)
    d, b = ident.hidden_size, 8
    layers = checkpoint_layers(ident.num_layers, interval)
    g = torch.Generator().manual_seed(seed)
    routers, projections = {}, {}
    for c in layers:
        mode = fire_at.get(c, "never")
        w1 = torch.zeros(b, d)
        b1 = torch.zeros(b)
        w2 = torch.zeros(1, b)
        b2 = torch.tensor([{"all": 30.0, "never": -30.0, "some": 0.0}[mode]])
        if mode == "some":
            w1[0] = torch.randn(d, generator=g) * 3.0 / d ** 0.5
            w2[0, 0] = 4.0
            b2 = torch.tensor([-1.0])
        routers[c] = {"down.weight": w1, "down.bias": b1, "up.weight": w2, "up.bias": b2}
        if projection == "affine":
            projections[c] = {"weight": torch.eye(d) + torch.randn(d, d, generator=g) * 0.02,
                              "bias": torch.randn(d, generator=g) * 0.02}
    ckpt = RouterCheckpoint(model=ident, layers=layers, bottleneck=b, routers=routers, projection=projection,
                            projections=projections, corpus="synthetic", tokens=0,
                            suggested_threshold=threshold, suggested_min_layer=min_layer)
    ckpt.save(path)
    return ckpt


class Reference:
    """The TIDE spec, directly on HF transformers, recomputing the whole sequence each time.

    A token exits at the first checkpoint >= min_layer whose router scores > threshold on
    final_norm(its residual stream); from then on its residual stream is frozen (so deeper layers'
    K/V for it come from the frozen state through each layer's own norm and projections) and its
    output is final_norm(frozen) -> exit projection -> LM head.
    """

    def __init__(self, model_dir: str, ckpt: RouterCheckpoint, threshold: float, min_layer: int):
        from transformers import AutoModelForCausalLM
        self.hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.ckpt, self.threshold, self.min_layer = ckpt, threshold, min_layer
        self.routers = {c: ckpt.router_module(c).eval() for c in ckpt.layers if c >= min_layer}

    @torch.no_grad()
    def run(self, ids: list[int]):
        """(logits [T, V], exit layer per token [-1: none], frozen states {layer: [T, D]})."""
        hf = self.hf
        norm = hf.model.norm
        t = len(ids)
        exit_at = torch.full((t,), -1)
        frozen = torch.zeros(t, hf.config.hidden_size)
        inputs = {}

        def hook(li):
            def fn(_m, _inp, out):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                done = exit_at >= 0
                h[0, done] = frozen[done]
                if li in self.routers:
                    z = router_input(h[0], norm.weight, norm.variance_epsilon)
                    new = (self.routers[li](z) > self.threshold) & ~done
                    frozen[new] = h[0, new]
                    exit_at[new] = li
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return fn

        def pre_hook(li):
            def fn(_m, args, kwargs):
                inputs[li] = (args[0] if args else kwargs["hidden_states"])[0].clone()
            return fn

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(hf.model.layers)]
        handles += [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                    for i, layer in enumerate(hf.model.layers)]
        try:
            hidden = hf.model(torch.tensor([ids])).last_hidden_state[0]
        finally:
            for h in handles:
                h.remove()
        for c, p in self.ckpt.projections.items():
            rows = exit_at == c
            hidden[rows] = torch.nn.functional.linear(hidden[rows], p["weight"], p["bias"])
        return hf.lm_head(hidden), exit_at, inputs

    @torch.no_grad()
    def layer_key(self, layer: int, x: torch.Tensor, position: int) -> torch.Tensor:
        """K of one token at a layer, from its layer input x [D], with the layer's own norm, projection,
        k-norm and rotary (rotary from the textbook formula, neox style)."""
        attn = self.hf.model.layers[layer].self_attn
        h = self.hf.model.layers[layer].input_layernorm(x[None])
        k = attn.k_proj(h).view(-1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        hd = attn.head_dim
        theta = self.hf.config.rope_parameters["rope_theta"]
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = position * inv
        cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
        k1, k2 = k[:, : hd // 2], k[:, hd // 2:]
        return torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
        seq, logits = list(ids), []
        for _ in range(n):
            lg = self.run(seq)[0]
            logits.append(lg[-1])
            seq.append(int(lg[-1].argmax()))
        return seq[len(ids):], logits
