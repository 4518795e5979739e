"""Test fixtures that need no vLLM: tiny HF models of every family variant, synthetic routers
(the ladder router among them), LoRA adapters and an EAGLE head. The reference is tests/reference.py."""
from __future__ import annotations

import os
import shutil

import torch

from vllm_tide.checkpoint import RouterCheckpoint, checkpoint_layers
from vllm_tide.fingerprint import model_identity
from vllm_tide.projection import ExitProjection

TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False}),
    # fused qkv_proj and gate_up_proj in the checkpoint; a separate LM head, as Phi-3 ships
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None, "pad_token_id": 0, "tie_word_embeddings": False}),
    # no fused residual, one tensor out of each layer; every multiplier away from 1 (Granite 3 ships
    # 12 / 1/128 / 0.22 / 8); the attention multiplier replaces 1/sqrt(head size)
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 4.0, "attention_multiplier": 0.09,
                                                        "residual_multiplier": 0.5, "logits_scaling": 2.5}),
    # Gemma 3 (the text model, as Gemma 3 1B ships): a 4-token sliding window, so that short prompts
    # see it; layer 5 of 8 is global (its own rotary base), the others slide
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 4}),
}
# Each branch of a family that changes the exits' arithmetic, as a real config: Llama's q/k/v/o biases;
# Ministral-3's llama_4_scaling of the query (read by vLLM's MistralAttention, unknown to HF's Mistral);
# Qwen2's q/k norms (`qk_norm`, read by vLLM's Qwen2Attention; Hugging Face has no such config, so the
# norm weights are added to the saved file). HF_RUNS: the variants Hugging Face computes as vLLM does.
VARIANTS = {
    "llama": ("llama", {}),
    "llama-bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {}),
    "mistral-llama4": ("mistral", {"llama_4_scaling": {"original_max_position_embeddings": 4, "beta": 0.3}}),
    "qwen2": ("qwen2", {}),
    "qwen2-qknorm": ("qwen2", {"qk_norm": True}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "granite": ("granite", {}),
    "gemma3": ("gemma3", {}),
}
HF_RUNS = ("llama", "llama-bias", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma3")


def make_tiny_model(family: str, out_dir: str, tokenizer_dir: str | None, num_layers: int = 8, seed: int = 0,
                    heads: tuple[int, int, int] = (2, 1, 64)) -> str:
    """A small random-weight model of a family or VARIANTS entry, saved with the default model's
    tokenizer (or, with tokenizer_dir None, a word-level one over WORDS, for machines without the
    default model). heads: (query heads, K/V heads, head size)."""
    import json
    import transformers
    from safetensors.torch import load_file, save_file
    family, variant = VARIANTS.get(family, (family, {}))
    cfg_name, model_name, extra = TINY[family]
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                  num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=heads[2],
                  max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-6)
    kwargs.update(extra)
    kwargs.update({k: v for k, v in variant.items() if k != "qk_norm"})
    cfg = getattr(transformers, cfg_name)(**kwargs)
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():   # larger than init-scale weights, so layers change the residual stream visibly
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0, 0.3)
            elif not name.endswith("model.norm.weight"):   # the routers' norm stays 1: their scores' scale
                p.uniform_(0.6, 1.4)
    model.save_pretrained(out_dir, safe_serialization=True)
    if variant.get("qk_norm"):
        weights = load_file(os.path.join(out_dir, "model.safetensors"))
        g = torch.Generator().manual_seed(seed + 7)
        for i in range(num_layers):
            for n in ("q_norm", "k_norm"):
                weights[f"model.layers.{i}.self_attn.{n}.weight"] = torch.rand(heads[2], generator=g) * 0.8 + 0.6
        save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({**config, "qk_norm": True}, f, indent=2)
    if tokenizer_dir is None:
        word_tokenizer(out_dir)
        return out_dir
    for f in os.listdir(tokenizer_dir):
        if f.startswith("tokenizer") or f.endswith(".jinja"):
            shutil.copy(os.path.join(tokenizer_dir, f), out_dir)
    return out_dir


WORDS = ("the state of the union is strong and the people are free to work and to build a nation "
         "where every child can learn and every family can hope for a better future together").split()


def word_tokenizer(out_dir: str) -> None:
    """A whitespace word-level tokenizer over WORDS (ids 2..; 0 unknown, 1 end of text), built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>").save_pretrained(out_dir)


def synthetic_router(model_dir: str, path: str, fire_at: dict[int, str], interval: int = 4, seed: int = 0,
                     projection: str = "identity", threshold: float = 0.5, min_layer: int = 0) -> RouterCheckpoint:
    """Routers built to fire on purpose: fire_at maps a checkpoint to "all" (every token exits there),
    or "some" (a random direction splits tokens); other checkpoints never fire."""
    ident = model_identity(model_dir)
    d, b = ident.hidden_size, 8
    layers = checkpoint_layers(ident.num_layers, interval)
    g = torch.Generator().manual_seed(seed)
    gp = torch.Generator().manual_seed(seed + 1000)    # projections: the routers do not depend on the kind
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
        temperature = 0.7 + 0.1 * c / ident.num_layers      # a different one per checkpoint
        if projection == "affine":
            projections[c] = ExitProjection(weight=torch.eye(d) + torch.randn(d, d, generator=gp) * 0.02,
                                            bias=torch.randn(d, generator=gp) * 0.02, temperature=temperature)
        elif projection == "lowrank":
            projections[c] = ExitProjection(u=torch.randn(d, 4, generator=gp) * 0.05, v=torch.randn(4, d, generator=gp) * 0.05,
                                            bias=torch.randn(d, generator=gp) * 0.02, temperature=temperature)
        elif projection == "temperature":
            projections[c] = ExitProjection(temperature=temperature)
    kind = "affine" if projection == "lowrank" else projection
    ckpt = RouterCheckpoint(model=ident, layers=layers, bottleneck=b, routers=routers, projection=kind,
                            projections=projections, corpus="synthetic", tokens=0,
                            suggested_threshold=threshold, suggested_min_layer=min_layer)
    ckpt.save(path)
    return ckpt


def ladder_router(model_dir: str, path: str, seed: int = 0, projection: str = "affine",
                  sample: list[list[int]] | None = None) -> dict[float, int]:
    """Routers at layers 1, 3, 5 whose score logits are -6, 0, +6 plus a token-dependent term (a
    random direction of the normed state, centred and scaled to spread 0.4 on the full model's states
    of the sample sequences: pass the ones the test will run, else 96 random tokens): one router file in which each threshold below sends a request's tokens to a
    known set of checkpoints, so one engine, through per-request thresholds, takes forced exits at
    every checkpoint and mixed depths in one batch. Returns {threshold: the checkpoint every token
    exits at (-1: none)}; mixing_threshold gives one that splits a sequence between two checkpoints."""
    import math
    from reference import TideReference
    ckpt = synthetic_router(model_dir, path, {}, interval=2, seed=seed, projection=projection)
    assert ckpt.layers == [1, 3, 5], ckpt.layers
    ref = TideReference(model_dir, None)
    if sample is None:
        sample = [torch.randint(2, ckpt.model.vocab_size, (96,), generator=torch.Generator().manual_seed(seed)).tolist()]
    runs = [ref.states(ids) for ids in sample]
    states = {c: torch.cat([r[c] for r in runs]) for c in ckpt.layers}
    d, g = ckpt.model.hidden_size, torch.Generator().manual_seed(seed + 500)
    for c, offset in zip(ckpt.layers, (-6.0, 0.0, 6.0)):
        w = torch.randn(d, generator=g, dtype=torch.float64)
        x = ref._norm(states[c], "model.norm.weight") @ w      # the routers see the final norm
        w1 = torch.zeros(ckpt.bottleneck, d)
        w1[0] = (w * 0.4 / x.std()).float()
        b1 = torch.zeros(ckpt.bottleneck)
        b1[0] = 10.0 - float(x.median() * 0.4 / x.std())   # silu(10 + x) ~ 10 + x: linear in the direction
        w2 = torch.zeros(1, ckpt.bottleneck)
        w2[0, 0] = 1.0
        ckpt.routers[c] = {"down.weight": w1, "down.bias": b1, "up.weight": w2, "up.bias": torch.tensor([offset - 10.0])}
    ckpt.save(path)
    sig = lambda x: 1 / (1 + math.exp(-x))      # noqa: E731
    return {sig(-9): 1, sig(-3): 3, sig(3): 5, sig(9): -1}


def mixing_threshold(ref, ids: list[int], layer: int) -> float:
    """A threshold that splits this sequence's tokens reaching ``layer`` (a ladder checkpoint) into
    some that exit there and some that go on: the midpoint of the widest gap between the middle half
    of their reference scores (so no token's fp32 score sits at the threshold)."""
    st = ref.states(ids)
    s = torch.sigmoid(torch.logit(ref._score(layer, st[layer]))).sort().values
    n = len(s)
    lo, hi = max(n // 4, 0), max(3 * n // 4, 1)
    k = lo + int((s[lo + 1: hi + 1] - s[lo:hi]).argmax())
    return float((s[k] + s[k + 1]) / 2)


def make_tp_model(out_dir: str, tokenizer_dir: str, seed: int = 0) -> str:
    """A tiny Llama whose 4 query and 2 K/V heads split over two tensor-parallel ranks
    (the default model's 9 heads do not)."""
    return make_tiny_model("llama", out_dir, tokenizer_dir, seed=seed, heads=(4, 2, 32))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(model_dir: str, adapter_dir: str, merged_dir: str, rank: int = 8, seed: int = 0) -> None:
    """A random PEFT LoRA adapter on every projection of every layer, and a copy of the model with the
    adapter merged into its weights (what the adapted model computes, as a plain model)."""
    import json
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    adapter, merged = {}, dict(weights)
    for name, w in weights.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if module not in LORA_TARGETS:
            continue
        a = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
        b = torch.randn(w.shape[0], rank, generator=g) * 0.3 / rank ** 0.5
        prefix = "base_model.model." + name[: -len(".weight")]
        adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"] = a, b
        merged[name] = w + b @ a                  # lora_alpha == rank: scaling 1
    os.makedirs(adapter_dir, exist_ok=True)
    save_file(adapter, os.path.join(adapter_dir, "adapter_model.safetensors"))
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "bias": "none",
                   "target_modules": list(LORA_TARGETS), "base_model_name_or_path": model_dir}, f)
    shutil.copytree(model_dir, merged_dir)
    save_file(merged, os.path.join(merged_dir, "model.safetensors"), metadata={"format": "pt"})


def make_eagle_head(model_dir: str, out_dir: str, seed: int = 0) -> str:
    """A random EAGLE-1 draft head for a Llama model: one decoder layer without its input norm and the
    `fc` that mixes the token embedding with the target's hidden state; embeddings and LM head are the
    target's (vLLM shares them when the head has none)."""
    import json
    from safetensors.torch import save_file
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    g = torch.Generator().manual_seed(seed)
    w = lambda *shape: torch.randn(*shape, generator=g) * 0.08      # noqa: E731
    layer = "layers.0."
    weights = {"fc.weight": w(d, 2 * d), layer + "post_attention_layernorm.weight": torch.ones(d),
               layer + "self_attn.q_proj.weight": w(q, d), layer + "self_attn.k_proj.weight": w(kv, d),
               layer + "self_attn.v_proj.weight": w(kv, d), layer + "self_attn.o_proj.weight": w(d, q),
               layer + "mlp.gate_proj.weight": w(inter, d), layer + "mlp.up_proj.weight": w(inter, d),
               layer + "mlp.down_proj.weight": w(d, inter)}
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**cfg, "num_hidden_layers": 1}, f)
    return out_dir
