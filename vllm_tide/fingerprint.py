"""Model identity computed from the model's files, not from loaded weights.

vLLM may cast, fuse or shard weights at load time, so the fingerprint hashes a few tensors *as
stored* in the safetensors files, plus the shape-defining part of config.json. It can therefore
be checked in the front-end process before any worker starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from .errors import TideConfigError

_CONFIG_KEYS = ("architectures", "num_hidden_layers", "hidden_size", "vocab_size",
                "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")


@dataclass(frozen=True)
class ModelIdentity:
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    fingerprint: str | None  # None when the weight files could not be read

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelIdentity":
        return cls(**json.loads(text))


def _hashed_tensor_names(num_layers: int, present) -> list[str]:
    """The final norm, and the first and last layers' input norm and K projection: k_proj, or the
    fused qkv_proj holding it in families that store one (Phi-3)."""
    names = ["model.norm.weight"]
    for i in (0, num_layers - 1):
        names.append(f"model.layers.{i}.input_layernorm.weight")
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        names.append(k if k in present else f"model.layers.{i}.self_attn.qkv_proj.weight")
    return [n for n in names if n in present]


def _safetensors_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> file, from the shard index when there is one."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        from safetensors import safe_open
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


def resolve_model_dir(model: str) -> str | None:
    """A local folder for ``model``: the path itself, or the offline HF cache snapshot."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, local_files_only=True)
    except Exception:
        return None


def model_identity(model_dir: str) -> ModelIdentity:
    cfg_path = os.path.join(model_dir, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise TideConfigError(f"Cannot read the model config {cfg_path} ({e}); point TIDE at a "
                              f"Hugging Face model folder that has a config.json.") from None
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    num_layers = int(cfg["num_hidden_layers"])
    digest = hashlib.sha256(json.dumps({k: cfg.get(k) for k in _CONFIG_KEYS}, sort_keys=True).encode())
    files = _safetensors_files(model_dir)
    names = _hashed_tensor_names(num_layers, files)
    fingerprint = None
    if names:
        import torch
        from safetensors import safe_open
        for name in names:
            with safe_open(files[name], framework="pt") as f:
                t = f.get_tensor(name).contiguous()
            digest.update(name.encode())
            digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        fingerprint = digest.hexdigest()[:24]
    return ModelIdentity(architecture=(cfg.get("architectures") or ["?"])[0], num_layers=num_layers,
                         hidden_size=int(cfg["hidden_size"]), vocab_size=int(cfg["vocab_size"]),
                         fingerprint=fingerprint)
