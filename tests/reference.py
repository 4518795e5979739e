"""An independent reference of TIDE's exits, for the tests.

It imports nothing from vllm_tide, nor from transformers' or vLLM's model code: the forward is written
here from the Hugging Face definitions of the supported families (RMSNorm, rotary, grouped-query
attention, SiLU-gated MLP) and reads the weights and the router file directly with safetensors. A bug
shared by the plugin and its reference cannot hide, because there is no shared code.

The spec it implements (vllm_tide/engine.py and vllm_tide/simulate.py state it too): a token exits at the first checkpoint >= min_layer whose router
scores > threshold on final_norm(its residual stream after that layer). From then on its residual
stream is frozen: every deeper layer computes the token's K and V from the frozen state through that
layer's own input norm, projections, q/k norms and rotary. Its logits are final_norm(frozen), then its
checkpoint's exit projection, then the LM head.

Everything is computed in float64, one causal pass over the whole sequence.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open

F64 = torch.float64


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k).to(F64) for k in f.keys()}, (f.metadata() or {})


class TideReference:
    """run(ids) -> (logits [T, V] float64, exit layer per token [-1: none], {layer: (K, V) [T, H_kv, hd]}).

    K and V per layer are what that layer's paged cache must hold at each position (for exited tokens,
    computed from their frozen state; K after q/k norm and rotary)."""

    def __init__(self, model_dir: str, router_path: str | None, threshold: float = 2.0, min_layer: int = 0):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = cfg = json.load(f)
        self.w = {}
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                self.w.update(load_tensors(os.path.join(model_dir, name))[0])
        self.n_layers = cfg["num_hidden_layers"]
        self.nq, self.nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.nq
        self.eps = cfg["rms_norm_eps"]
        # Gemma 3: norms multiply by 1 + w, sandwich norms around attention and MLP, GELU (tanh), scaled
        # embeddings, query_pre_attn_scalar, and sliding-window layers with their own rotary base
        self.gemma = cfg["model_type"].startswith("gemma")
        types = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
        self.sliding = [t == "sliding_attention" for t in types]
        self.window = cfg.get("sliding_window")
        rope = cfg.get("rope_parameters") or {}
        self.theta = []
        for t in types:
            r = rope.get(t, rope)                 # per layer type (Gemma 3), else one for all
            assert r.get("rope_type", "default") == "default", "the reference knows only the default rotary"
            assert r.get("partial_rotary_factor", 1.0) == 1.0, "the reference rotates whole heads"
            self.theta.append(r.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        self.llama4 = cfg.get("llama_4_scaling")          # Mistral-family query scaling, else None
        self.qk_norm = cfg["model_type"] == "qwen3" or bool(cfg.get("qk_norm")) or self.gemma
        # Granite's multipliers (1 elsewhere): embeddings, each block's residual update, attention
        # scores (instead of 1/sqrt(head size)) and the logits (divided by logits_scaling)
        granite = cfg["model_type"] == "granite"
        self.embedding_multiplier = cfg.get("embedding_multiplier", 1.0) if granite else 1.0
        self.residual_multiplier = cfg.get("residual_multiplier", 1.0) if granite else 1.0
        self.attention_scale = cfg["attention_multiplier"] if granite else \
            cfg["query_pre_attn_scalar"] ** -0.5 if self.gemma else 1 / math.sqrt(self.hd)
        if self.gemma:
            self.embedding_multiplier = cfg["hidden_size"] ** 0.5
        self.logits_scaling = cfg.get("logits_scaling", 1.0) if granite else 1.0
        self.threshold, self.min_layer = threshold, min_layer
        self.routers, self.projections = {}, {}
        if router_path is not None:
            t, meta = load_tensors(router_path)
            for c in json.loads(meta["checkpoint_layers"]):
                if c >= min_layer:
                    self.routers[c] = [t[f"router.{c}.{n}"] for n in ("down.weight", "down.bias", "up.weight", "up.bias")]
                    self.projections[c] = {k.split(".", 2)[2]: v for k, v in t.items()
                                           if k.startswith(f"projection.{c}.")}

    def _p(self, name: str) -> torch.Tensor | None:
        return self.w.get(name)

    def _norm(self, x, name: str):
        w = self.w[name]
        return rms_norm(x, 1 + w if self.gemma else w, self.eps)

    def _linear(self, x, prefix: str):
        y = x @ self.w[prefix + ".weight"].T
        b = self._p(prefix + ".bias")
        return y if b is None else y + b

    def _score(self, c: int, h: torch.Tensor) -> torch.Tensor:
        dw, db, uw, ub = self.routers[c]
        z = self._norm(h, "model.norm.weight")
        a = z @ dw.T + db
        return torch.sigmoid((a * torch.sigmoid(a)) @ uw.T + ub)[:, 0]

    def _project(self, c: int, y: torch.Tensor) -> torch.Tensor:
        p = self.projections[c]
        if "weight" in p:
            y = y @ p["weight"].T
        elif "u" in p:
            y = y + (y @ p["v"].T) @ p["u"].T
        if "bias" in p:
            y = y + p["bias"]
        return y / float(p["temperature"].reshape(-1)[0]) if "temperature" in p else y

    def states(self, ids: list[int]) -> dict[int, torch.Tensor]:
        """Each layer's output residual stream [T, D] (with this reference's exits)."""
        return self.run(ids, keep_states=True)[3]

    @torch.no_grad()
    def run(self, ids: list[int], keep_states: bool = False):
        T, hd = len(ids), self.hd
        h = self.w["model.embed_tokens.weight"][torch.tensor(ids)] * self.embedding_multiplier
        pos = torch.arange(T, dtype=F64)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        near = causal & (pos[:, None] - pos[None, :] < (self.window or T))         # a sliding window
        exit_at = torch.full((T,), -1)
        frozen = torch.zeros_like(h)
        kv, states = {}, {}
        for li in range(self.n_layers):
            p = f"model.layers.{li}."
            inv = 1.0 / self.theta[li] ** (torch.arange(0, hd, 2, dtype=F64) / hd)
            ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)     # [T, hd]
            cos, sin = ang.cos()[:, None], ang.sin()[:, None]
            x = self._norm(h, p + "input_layernorm.weight")
            if p + "self_attn.qkv_proj.weight" in self.w:      # Phi-3: one fused projection, q then k then v
                q, k, v = self._linear(x, p + "self_attn.qkv_proj").split(
                    [self.nq * hd, self.nkv * hd, self.nkv * hd], dim=-1)
            else:
                q, k, v = (self._linear(x, p + f"self_attn.{n}_proj") for n in "qkv")
            q, k, v = q.reshape(T, self.nq, hd), k.reshape(T, self.nkv, hd), v.reshape(T, self.nkv, hd)
            if self.qk_norm:
                q = self._norm(q, p + "self_attn.q_norm.weight")
                k = self._norm(k, p + "self_attn.k_norm.weight")
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if self.llama4:   # 1 + beta * log(1 + floor(pos / original max positions)), on the query only
                s = 1 + self.llama4["beta"] * torch.log1p(torch.floor(pos / self.llama4["original_max_position_embeddings"]))
                q = q * s[:, None, None]
            kv[li] = (k.clone(), v.clone())
            rep = self.nq // self.nkv
            kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            att = torch.einsum("thd,shd->hts", q, kk) * self.attention_scale
            att = att.masked_fill(~(near if self.sliding[li] else causal), float("-inf")).softmax(-1)
            o = self._linear(torch.einsum("hts,shd->thd", att, vv).reshape(T, self.nq * hd), p + "self_attn.o_proj")
            if self.gemma:
                h = h + self._norm(o, p + "post_attention_layernorm.weight")
                x = self._norm(h, p + "pre_feedforward_layernorm.weight")
            else:
                h = h + o * self.residual_multiplier
                x = self._norm(h, p + "post_attention_layernorm.weight")
            if p + "mlp.gate_up_proj.weight" in self.w:         # Phi-3: gate then up, fused
                g, u = self._linear(x, p + "mlp.gate_up_proj").chunk(2, dim=-1)
            else:
                g, u = self._linear(x, p + "mlp.gate_proj"), self._linear(x, p + "mlp.up_proj")
            if self.gemma:        # GELU, tanh approximation; then the post-feedforward norm
                act = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
                h = h + self._norm(self._linear(act * u, p + "mlp.down_proj"), p + "post_feedforward_layernorm.weight")
            else:
                h = h + self._linear(g * torch.sigmoid(g) * u, p + "mlp.down_proj") * self.residual_multiplier
            done = exit_at >= 0
            h[done] = frozen[done]
            if li in self.routers:
                new = (self._score(li, h) > self.threshold) & ~done
                exit_at[new] = li
                frozen[new] = h[new]
            if keep_states:
                states[li] = h.clone()
        y = self._norm(h, "model.norm.weight")
        for c in self.projections:
            rows = exit_at == c
            if rows.any():
                y[rows] = self._project(c, y[rows])
        head = self._p("lm_head.weight")
        logits = y @ (self.w["model.embed_tokens.weight"] if head is None else head).T / self.logits_scaling
        return (logits, exit_at, kv, states) if keep_states else (logits, exit_at, kv)
