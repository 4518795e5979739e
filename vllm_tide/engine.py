"""The early-exit mechanism, written once for every supported family.

Per step (the control flow is eager Python; runs of full layers between checkpoints and partial layers
go through compiled_layers, compiled as stock vLLM compiles its model unless the engine runs with
enforce_eager):
- A step in which no token may exit (all its requests have exits off) is the stock forward itself.
- Layers run stock until some token exits at a checkpoint (router score > threshold, layer >= min_layer)
  and the exit saves work in its step (see _take): always when it leaves no row running (a single
  decode token, or the last rows of a step), and otherwise when enough rows of the step have exited
  for the rest to run on fewer rows. An exit that would save nothing is deferred: the token keeps
  running, exactly as without exits, and its router is asked again at the next checkpoint.
- An exited token's residual stream x_e is frozen. In vLLM's fused-residual form it is kept as
  (hidden=0, residual=x_e), so each deeper layer's fused add+norm yields norm(x_e) for it.
- While some tokens are still running, each deeper layer runs its attention block over all tokens
  (exited tokens thereby write K/V computed from x_e into that layer's paged cache, and the attention
  metadata stays untouched); the output projection, post-attention norm, MLP and residual update run
  only on the running rows (gather -> compute -> scatter): "partial" token-layers.
- Once every token has exited, the remaining layers only fill K/V: one stacked GEMM over all deeper
  layers' folded K/V weights, k-norm and rotary, then each layer's cache write. Attention and MLP are
  skipped entirely. Those are "skipped" token-layers.
- With LoRA adapters (whose kernels index adapters by the step's token order and which change K/V),
  partial layers run every row and keep the running ones, and the fill goes layer by layer through
  the adapted modules: same results as above for an adapter-merged model, less saved.
- An exited token's output is final_norm(x_e), then its checkpoint's exit projection.
"""
from __future__ import annotations

import logging

import torch

from . import ops
from .checkpoint import OFF, RouterCheckpoint
from .kv_cache import write_layers_kv
from .router import norm_weight_eps
from .compiled_layers import SegmentRunner
from .settings import DEFAULT_SPLIT_RULE
from .stats import ExitCounters

logger = logging.getLogger("vllm.tide")


class DecoderAdapter:
    """Where a family keeps its pieces and how its layers are called. The Llama layout (vLLM's fused
    residual: a layer takes and returns (hidden, residual), the stream being their sum); other families
    override what differs."""

    def embed(self, model, input_ids, inputs_embeds):
        return inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)

    def layer(self, layer, positions, h, residual):
        return layer(positions, h, residual)

    def partial_layer(self, layer, positions, h, residual, running, all_rows: bool = False):
        """One layer with only the ``running`` rows continuing: the attention block runs over all rows
        (so exited rows write this layer's K/V from their frozen state), the output projection, MLP and
        residual update over the running rows only (``all_rows``: over every row, only the running rows
        kept, for LoRA); exited rows keep (hidden=0, residual=frozen)."""
        h, residual = layer.input_layernorm(h, residual)
        attn_out = self.attention_core(layer.self_attn, positions, h)
        h_new = torch.zeros_like(h)
        if all_rows:
            a, _ = layer.self_attn.o_proj(attn_out)
            a, r = self.mlp_block(layer, a, residual.clone())   # the fused add may write in place
            ops.scatter_rows(h_new, running, a.index_select(0, running))
            ops.scatter_rows(residual, running, r.index_select(0, running))
            return h_new, residual
        a, _ = layer.self_attn.o_proj(attn_out.index_select(0, running))
        a, r = self.mlp_block(layer, a, residual.index_select(0, running))
        ops.scatter_rows(h_new, running, a)
        ops.scatter_rows(residual, running, r)
        return h_new, residual

    def mlp_block(self, layer, attn_out, residual):
        """From the attention output projection to the layer's (hidden, residual) output."""
        a, r = layer.post_attention_layernorm(attn_out, residual)
        return layer.mlp(a), r

    def attention_core(self, attn, positions: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """The attention block up to (not including) the output projection; writes this layer's K/V."""
        return attn.attn(*self.qkv(attn, positions, normed))

    def qkv(self, attn, positions: torch.Tensor, normed: torch.Tensor):
        """The query, key and value the layer's attention takes (norms, rotary and scaling applied)."""
        qkv, _ = attn.qkv_proj(normed)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = self.qk_norm(attn, q, k)
        q, k = attn.rotary_emb(positions, q, k)
        q = self.scale_query(attn, positions, q)
        return q, k, v

    def qk_norm(self, attn, q, k):
        return q, k

    def k_norm(self, attn) -> tuple[torch.Tensor, float] | None:
        return None

    def scale_query(self, attn, positions, q):
        return q


class Qwen3Adapter(DecoderAdapter):
    """Qwen3: per-head RMS norms on q and k before the rotary; the K/V fill applies the k-norm too."""

    def qk_norm(self, attn, q, k):
        n = q.shape[0]
        q = attn.q_norm(q.view(n, -1, attn.head_dim)).view(n, -1)
        k = attn.k_norm(k.view(n, -1, attn.head_dim)).view(n, -1)
        return q, k

    def k_norm(self, attn):
        return norm_weight_eps(attn.k_norm)      # the weight as the norm applies it (1 + w for Gemma's)


class Gemma3Adapter(Qwen3Adapter):
    """Gemma 3: q/k norms (Gemma norms multiply by 1 + w: norm_weight_eps gives the fill that weight),
    sandwich norms around the attention and the MLP, sliding-window layers with their own rotary
    base (the fill runs each run of layers with one rotary table). Its embedding scale is in vLLM's
    embed_input_ids; query_pre_attn_scalar and the sliding windows are the attention layers' own."""

    def mlp_block(self, layer, attn_out, residual):
        a = layer.post_attention_layernorm(attn_out)
        a, r = layer.pre_feedforward_layernorm(a, residual)
        return layer.post_feedforward_layernorm(layer.mlp(a)), r


class Qwen2Adapter(Qwen3Adapter):
    """Qwen2 has q/k norms only when its config asks for them."""

    def qk_norm(self, attn, q, k):
        return super().qk_norm(attn, q, k) if getattr(attn, "qk_norm", False) else (q, k)

    def k_norm(self, attn):
        return super().k_norm(attn) if getattr(attn, "qk_norm", False) else None


class GraniteAdapter(DecoderAdapter):
    """Granite's layers take and return the residual stream itself (no fused residual), each block's
    update scaled by residual_multiplier, and the embeddings by embedding_multiplier. The engine holds
    its stream in the fused form as (hidden=0, residual=stream), so routing, freezing and the final
    norm are unchanged. Its attention_multiplier is the attention layer's own scale, and its
    logits_scaling is applied by the model's logits processor, to exited rows as to the others."""

    def embed(self, model, input_ids, inputs_embeds):
        return super().embed(model, input_ids, inputs_embeds) * model.config.embedding_multiplier

    def layer(self, layer, positions, h, residual):
        x = layer(positions, h if residual is None else h + residual)
        return torch.zeros_like(x), x

    def partial_layer(self, layer, positions, h, residual, running, all_rows: bool = False):
        x = h + residual                  # exited rows: hidden 0, so their frozen stream
        attn_out = self.attention_core(layer.self_attn, positions, layer.input_layernorm(x))
        rows = slice(None) if all_rows else running
        a, _ = layer.self_attn.o_proj(attn_out[rows])
        y = x[rows] + a * layer.residual_multiplier
        y = y + layer.mlp(layer.post_attention_layernorm(y)) * layer.residual_multiplier
        ops.scatter_rows(x, running, y.index_select(0, running) if all_rows else y)
        return torch.zeros_like(x), x


class MistralAdapter(DecoderAdapter):
    """Mistral: the Llama layout, plus Ministral-3's llama_4_scaling of the query by position (K/V untouched)."""

    def scale_query(self, attn, positions, q):
        if getattr(attn, "do_llama_4_scaling", False):
            q = (q * attn._get_llama_4_attn_scale(positions)).to(q.dtype)
        return q


def _rotary_runs(ropes: list) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive layers that share one rotary module: a single run, except where
    layers alternate rotary bases (Gemma 3's sliding-window and global layers)."""
    runs = []
    for j, rope in enumerate(ropes):
        if runs and ropes[runs[-1][0]] is rope:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


def _real_step() -> tuple[bool, int | None]:
    """(is this a real step with attention metadata, number of real tokens if padding is marked)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available
    if not is_forward_context_available():
        return False, None
    ctx = get_forward_context()
    real = bool(ctx.attn_metadata)
    pad = getattr(ctx, "is_padding", None)
    return real, (None if pad is None else int((~pad).sum()))


class EarlyExitEngine:
    def __init__(self, ckpt: RouterCheckpoint, threshold: float, min_layer: int, adapter: DecoderAdapter,
                 run_layers: SegmentRunner | None = None, lora: bool = False,
                 split_rule: tuple[int, float] = DEFAULT_SPLIT_RULE):
        self.ckpt = ckpt
        # With LoRA, the adapted projections must see every row of the step in its order (vLLM's LoRA
        # kernels index adapters by token position) and the K/V fill must include the adapters' deltas:
        # partial layers then compute all rows and keep the running ones, and the fill runs layer by
        # layer through the (adapted) modules instead of the stacked GEMM over the base weights.
        self.lora = lora
        self.threshold = threshold
        self.min_layer = min_layer
        self.adapter = adapter
        self.layers = [c for c in ckpt.layers if c >= min_layer]
        self.counters = ExitCounters(self.layers, ckpt.model.num_layers)
        self._routers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._proj: dict = {}      # layer -> ExitProjection on the model's device
        self._kv: dict | None = None
        self._tp = None
        self.run_layers = run_layers or SegmentRunner()     # compiled as the engine compiles, or eager
        self.run_layers.adapter = adapter
        # when exits that leave rows running are taken (see _take; settings.py)
        self.split_min_rows, self.split_min_fraction = split_rule
        # per-request thresholds of the current step, set by the model runner (request_control)
        self.step_thresholds: torch.Tensor | None = None
        self.step_min = threshold

    # ------------------------------------------------------------------ set-up after weights are loaded
    def prepare(self, lm) -> None:
        from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
        # Under tensor parallelism the router sees the replicated hidden state on every rank; the
        # K/V fill uses each rank's own shard of the K/V heads (q_size/kv_size are per rank).
        self._tp = get_tp_group() if get_tensor_model_parallel_world_size() > 1 else None
        model = lm.model
        # a step runs whole segments of layers up to the next routing checkpoint (or the last layer)
        ends = sorted(c for c in self.layers if c < len(model.layers) - 1) + [len(model.layers) - 1]
        self._segment_end = {0: ends[0], **{a + 1: b for a, b in zip(ends, ends[1:])}}
        dev = model.norm.weight.device
        for c in self.layers:
            r = self.ckpt.routers[c]
            self._routers[c] = (r["down.weight"].float().to(dev), r["down.bias"].float().to(dev),
                                r["up.weight"].float().reshape(-1).to(dev), r["up.bias"].float().reshape(1).to(dev))
            if c in self.ckpt.projections:
                self._proj[c] = self.ckpt.projections[c].to(dev)
        self._norm = norm_weight_eps(model.norm)
        attns = [layer.self_attn for layer in model.layers]
        a0 = attns[0]
        q, kv = a0.q_size, a0.kv_size
        norms = [norm_weight_eps(layer.input_layernorm)[0] for layer in model.layers]
        kv_w = [a.qkv_proj.weight.data[q:q + 2 * kv] for a in attns]
        biases = [getattr(a.qkv_proj, "bias", None) for a in attns]
        knorms = [self.adapter.k_norm(a) for a in attns]
        ropes = [a.rotary_emb for a in attns]
        self._kv = {
            "w": ops.fold_kv_weights(kv_w, norms),              # [L*2*kv, D]
            "bias": None if biases[0] is None else torch.cat([b.data[q:q + 2 * kv] for b in biases]),
            "k_norm": None if knorms[0] is None else torch.stack([w.data for w, _ in knorms]),
            "k_norm_eps": 0.0 if knorms[0] is None else float(knorms[0][1]),
            "eps": norm_weight_eps(model.layers[0].input_layernorm)[1],
            "kv_size": kv, "num_kv_heads": a0.num_kv_heads, "head_size": a0.head_dim,
            "runs": _rotary_runs(ropes), "ropes": ropes,
            "layer_names": [a.attn.layer_name for a in attns],
        }

    # ------------------------------------------------------------------ forward
    def forward(self, lm, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        model = lm.model
        real, n_real = _real_step()
        if not real:  # profile and dummy runs: the stock path, uncounted; they also compile the layers
            if self.run_layers.compiled and not self.run_layers.traced and positions.shape[-1] > 2:
                self._warm_up(model, input_ids, positions, inputs_embeds)
            return model(input_ids, positions, None, inputs_embeds)
        n = positions.shape[-1]
        self.counters.tokens += n if n_real is None else n_real
        thresholds, routing = self._step_thresholds(n, n_real, positions.device)
        if not routing:   # no token of this step may exit: stock vLLM's own forward, bit for bit
            return model(input_ids, positions, None, inputs_embeds)
        h = self.adapter.embed(model, input_ids, inputs_embeds)
        residual = None
        exits = []                 # (checkpoint layer, row indices that exited there)
        running = None             # row indices still running; None means all
        num_layers = len(model.layers)
        i = 0
        while i < num_layers:
            score = None
            if running is None:    # every row through the segment to the next checkpoint
                if self._segment_end[i] == num_layers - 1:
                    # the rest of the stack and the final norm in one call, as stock runs them
                    return self._final_segment(model, i, positions, h, residual)
                i, h, residual, score = self._segment(model, i, positions, h, residual)
            elif running.numel() == 0:
                self._fill_kv(model, residual, positions, i)
                self.counters.skipped += n * (num_layers - i)
                break
            else:
                h, residual = self.run_layers.partial(i, model.layers[i], self.adapter, positions, h, residual,
                                                      running, all_rows=self.lora)
                if not self.lora:     # with LoRA every row ran the whole layer: nothing was saved
                    self.counters.partial += n - running.numel()
            if i in self._routers:
                h, residual, running = self._route(i, n, h, residual, exits, running, thresholds, score)
            i += 1
        out, _ = model.norm(h, residual)
        return self._project_exits(out, exits)

    def _take(self, n: int, num_running: int, num_exits: int) -> bool:
        """Whether exits that fired at a checkpoint are taken, or deferred because they would save nothing.

        Taken exits save work when they leave no row running (the remaining layers only fill K/V), or
        when they leave the step split: deeper layers then run their output projection and MLP on the
        running rows only, but as one call per layer with row gathers, which pays only once at least
        ``split_min_rows`` rows and ``split_min_fraction`` of the step have exited. Below that a step
        would compute every row anyway, so an exit would cost the token its deeper layers' accuracy
        (and its K/V the exact values) for nothing: it is deferred, the token runs on as if its router
        had not fired, and later checkpoints may take it.
        """
        exited = n - num_running + num_exits
        return num_exits == num_running or (exited >= self.split_min_rows and exited >= self.split_min_fraction * n)

    def _warm_up(self, model, input_ids, positions, inputs_embeds) -> None:
        """Trace every compiled function during vLLM's start-up dummy runs, not on the first request."""
        h = self.adapter.embed(model, input_ids, inputs_embeds)
        residual, i = None, 0
        while self._segment_end[i] < len(model.layers) - 1:
            end, h, residual, _ = self._segment(model, i, positions, h, residual)
            i = end + 1
        self._final_segment(model, i, positions, h, residual)
        # 2 running rows out of more than 2: neither size is specialised (a 1 would be) nor unified
        running = torch.arange(2, device=h.device)
        # every layer after the first checkpoint can be partial (a shared graph serves them all)
        first = min(self._routers, default=len(model.layers)) + 1
        for j in range(first, len(model.layers)):
            self.run_layers.partial(j, model.layers[j], self.adapter, positions, h, residual, running,
                                    all_rows=self.lora)
            if self.run_layers.shared_partial:
                break

    def _segment(self, model, start, positions, h, residual):
        """Run layers start..end, end being the next routing checkpoint or the last layer.

        Returns (end, h, residual, score at end or None); compiled, the end's router scores all rows
        in the segment's graph, eagerly _route scores them.
        """
        end = self._segment_end[start]
        if self.run_layers.compiled and end in self._routers:
            h, residual, score = self.run_layers(model.layers, start, end, positions, h, residual,
                                                 (*self._norm, *self._routers[end]))
            return end, h, residual, score
        return (end, *self.run_layers(model.layers, start, end, positions, h, residual), None)

    def _final_segment(self, model, start, positions, h, residual) -> torch.Tensor:
        """Layers start..last and the final norm: the step's hidden output, no row having exited."""
        return self.run_layers(model.layers, start, len(model.layers) - 1, positions, h, residual,
                               final_norm=model.norm)

    def _step_thresholds(self, n: int, n_real: int | None = None,
                         device: torch.device | None = None) -> tuple[torch.Tensor | None, bool]:
        """(per-token thresholds or None for the engine's one, whether any token of the step may exit).
        Rows past ``n_real`` (padding) never exit: they are not the step's tokens, nor counted as such."""
        thr, may_exit = self.step_thresholds, self.step_min < OFF
        if thr is None:     # every request at the engine's threshold (OFF: the router's default is exits off)
            may_exit = self.threshold < OFF
            if n_real is None or n_real >= n or not may_exit:
                return None, may_exit
            # (the runner set step_min to this threshold for the step: _route scores at it)
            thr = torch.full((n_real,), self.threshold, dtype=torch.float32, device=device)
        if thr.numel() < n:        # padded rows never exit
            thr = torch.cat([thr, thr.new_full((n - thr.numel(),), OFF)])
        return thr[:n], may_exit

    def _route(self, layer, n, h, residual, exits, running, thresholds=None, score=None):
        """Score the running rows of the step's ``n`` at checkpoint ``layer`` (unless the compiled segment
        already did); if their exits are taken (_take), freeze the exiting rows and append (layer, their
        rows) to ``exits``. Returns (h, residual, running), ``running`` being the same object when no
        row exited."""
        # with per-request thresholds: score at the step's lowest, then hold each row to its own
        bar = self.threshold if thresholds is None else self.step_min
        if score is None:
            x = h + residual if running is None else h.index_select(0, running) + residual.index_select(0, running)
            w1, b1, w2, b2 = self._routers[layer]
            active = torch.ones(x.shape[0], dtype=torch.bool, device=h.device)
            score, fire = ops.router_score(x, self._norm[0], self._norm[1], w1, b1, w2, b2, bar, active)
        else:
            fire = score > bar
        if thresholds is not None:
            fire = fire & (score > (thresholds if running is None else thresholds.index_select(0, running)))
        if self._tp is not None:     # every rank must take the same branch: rank 0's decision rules
            fire = self._tp.broadcast(fire.to(torch.uint8), src=0).bool()
        num_exits = int(fire.sum())     # the one host sync per checkpoint: the layer loop branches on it
        if num_exits == 0:
            return h, residual, running
        if not self._take(n, fire.shape[0], num_exits):
            self.counters.deferred += num_exits
            return h, residual, running
        order, _ = ops.compact(fire)
        k = fire.shape[0] - num_exits
        if running is not None:      # positions among the running rows -> rows of the step
            order = running.index_select(0, order)
        exited, running = order[k:], order[:k]
        exits.append((layer, exited))
        self.counters.exits[layer] += num_exits
        # freeze as (hidden, residual) = (0, x_e), so later fused add+norms give norm(x_e)
        ops.scatter_rows(residual, exited, h.index_select(0, exited) + residual.index_select(0, exited))
        h.index_fill_(0, exited, 0.0)
        return h, residual, running

    def _fill_kv(self, model, frozen: torch.Tensor, positions: torch.Tensor, start: int) -> None:
        """Every token has exited: write layers start.. K/V from the frozen states, nothing else."""
        if self.lora:
            return self._fill_kv_through_modules(model, frozen, positions, start)
        kv = self._kv
        for a, b in kv["runs"]:
            a = max(a, start)
            if a >= b:
                continue
            rope, rows = kv["ropes"][a], slice(a * 2 * kv["kv_size"], b * 2 * kv["kv_size"])
            k, v = ops.kv_project(frozen, kv["w"][rows], None if kv["bias"] is None else kv["bias"][rows], kv["eps"],
                                  None if kv["k_norm"] is None else kv["k_norm"][a:b], kv["k_norm_eps"],
                                  rope.cos_sin_cache, positions, b - a, kv["num_kv_heads"], kv["head_size"],
                                  rope.rotary_dim, bool(rope.is_neox_style))
            write_layers_kv(kv["layer_names"][a:b], k, v)

    def _fill_kv_through_modules(self, model, frozen, positions, start: int) -> None:
        """_fill_kv one layer at a time through the layers' own norm and K/V projection (so LoRA applies)."""
        from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
        n, heads, head_size = frozen.shape[0], self._kv["num_kv_heads"], self._kv["head_size"]
        for layer in model.layers[start:]:
            _, k, v = self.adapter.qkv(layer.self_attn, positions, layer.input_layernorm(frozen))
            unified_kv_cache_update(k.reshape(n, heads, head_size), v.reshape(n, heads, head_size),
                                    layer.self_attn.attn.layer_name)

    def _project_exits(self, out: torch.Tensor, exits: list) -> torch.Tensor:
        """Each exited row gets its own checkpoint's projection (only exited rows are touched)."""
        for layer, rows in exits:
            proj = self._proj.get(layer)
            if proj is not None:
                ops.scatter_rows(out, rows, proj.apply(out.index_select(0, rows)).to(out.dtype))
        return out
