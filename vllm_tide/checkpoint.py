"""The router checkpoint: one .safetensors file with routers, optional exit projections and
metadata that says exactly what they were calibrated for."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .errors import TideConfigError
from .fingerprint import ModelIdentity
from .projection import PROJECTIONS, ExitProjection
from .router import ROUTER_INPUT

FORMAT_NAME = "vllm-tide-router"
FORMAT_VERSION = 1
ROUTER_TENSORS = ("down.weight", "down.bias", "up.weight", "up.bias")    # one router's, exit or drafting
CRITERIA = ("top1", "cosine", "kl")
__all__ = ["CRITERIA", "OFF", "PROJECTIONS", "RouterCheckpoint", "checkpoint_layers", "check_threshold"]


def checkpoint_layers(num_layers: int, interval: int) -> list[int]:
    """Every ``interval``-th layer (0-based: interval-1, 2*interval-1, ...), never the final layer:
    an "exit" after the last layer skips nothing."""
    if not 1 <= interval < num_layers:
        raise TideConfigError(f"The checkpoint interval must be between 1 and {num_layers - 1} for a "
                              f"{num_layers}-layer model, got {interval}; pass an --interval in that range.")
    return list(range(interval - 1, num_layers - 1, interval))


# The threshold of exits off: no router score (a sigmoid, <= 1) exceeds it, and a step in which every
# token has it runs stock vLLM's forward. Explicit settings stop at 1.0, which runs the routers but
# never exits (to measure their overhead).
OFF = 2.0


def check_threshold(threshold: float) -> float:
    # a bool is an int to Python: True would pass as 1.0 (the per-request check refuses booleans too)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) <= 1.0:
        raise TideConfigError(f"The TIDE threshold must be a number in (0, 1], got {threshold!r}; "
                              f"1.0 runs the routers without ever exiting.")
    return float(threshold)


@dataclass
class RouterCheckpoint:
    model: ModelIdentity
    layers: list[int]                      # checkpoint layers that carry a router
    bottleneck: int
    routers: dict[int, dict[str, torch.Tensor]]       # layer -> {down.weight, down.bias, up.weight, up.bias}
    projection: str = "identity"
    projections: dict[int, ExitProjection] = field(default_factory=dict)   # empty for identity
    criterion: str = "top1"
    corpus: str = ""
    tokens: int = 0
    suggested_threshold: float = 0.9
    suggested_min_layer: int = 0
    extra: dict = field(default_factory=dict)   # free-form calibration report
    # lossless mode's drafting routers (top-1 labels; vllm_tide.drafting), same shapes; empty in older files
    draft_routers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file
        tensors = {}
        for kind, routers in (("router", self.routers), ("draft_router", self.draft_routers)):
            for layer, params in routers.items():
                for name, t in params.items():
                    tensors[f"{kind}.{layer}.{name}"] = t.detach().float().contiguous().cpu()
        for layer, proj in self.projections.items():
            for name, t in proj.tensors().items():
                tensors[f"projection.{layer}.{name}"] = t.detach().float().contiguous().cpu()
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "model": self.model.to_json(),
            "router_input": ROUTER_INPUT,
            "checkpoint_layers": json.dumps(self.layers),
            "bottleneck": str(self.bottleneck),
            "criterion": self.criterion,
            "exit_projection": self.projection,
            "corpus": self.corpus,
            "tokens": str(self.tokens),
            "suggested_threshold": repr(float(self.suggested_threshold)),
            "suggested_min_layer": str(self.suggested_min_layer),
            "extra": json.dumps(self.extra, sort_keys=True),
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "RouterCheckpoint":
        from safetensors import safe_open
        if not os.path.isfile(path):
            raise TideConfigError(f"The TIDE router file {path} does not exist; create one with "
                                  f"`python calibration/calibrate.py --model MODEL --output {path}`.")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for damaged files
            raise TideConfigError(f"The TIDE router file {path} is truncated or corrupt ({type(e).__name__}); "
                                  f"recalibrate it with calibration/calibrate.py.") from None
        if meta.get("format") != FORMAT_NAME:
            raise TideConfigError(f"{path} is not a TIDE router checkpoint (no '{FORMAT_NAME}' metadata); "
                                  f"pass a file written by calibration/calibrate.py.")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise TideConfigError(f"{path} has router format version {meta.get('format_version')!r} but this "
                                  f"vllm-tide reads version {FORMAT_VERSION}; recalibrate with this version.")
        try:
            layers = json.loads(meta["checkpoint_layers"])
            ckpt = cls(model=ModelIdentity.from_json(meta["model"]), layers=layers,
                       bottleneck=int(meta["bottleneck"]), routers={}, projection=meta["exit_projection"],
                       criterion=meta["criterion"], corpus=meta["corpus"], tokens=int(meta["tokens"]),
                       suggested_threshold=float(meta["suggested_threshold"]),
                       suggested_min_layer=int(meta["suggested_min_layer"]),
                       extra=json.loads(meta.get("extra", "{}")))
            for layer in layers:
                ckpt.routers[layer] = {n: tensors[f"router.{layer}.{n}"] for n in ROUTER_TENSORS}
                if f"draft_router.{layer}.up.bias" in tensors:
                    ckpt.draft_routers[layer] = {n: tensors[f"draft_router.{layer}.{n}"] for n in ROUTER_TENSORS}
                prefix = f"projection.{layer}."
                found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if ckpt.projection != "identity":
                    if not found:
                        raise KeyError(f"projection.{layer}")
                    ckpt.projections[layer] = ExitProjection.from_tensors(found)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise TideConfigError(f"The TIDE router file {path} has incomplete metadata or tensors "
                                  f"(missing {e}); recalibrate it with calibration/calibrate.py.") from None
        ckpt.validate_shapes(path)
        return ckpt

    def validate_shapes(self, path: str) -> None:
        if self.projection not in PROJECTIONS:
            raise TideConfigError(f"{path} uses exit projection {self.projection!r}, which this vllm-tide does not "
                                  f"know (known: {', '.join(PROJECTIONS)}); upgrade vllm-tide or recalibrate.")
        d, b = self.model.hidden_size, self.bottleneck
        want = {"down.weight": (b, d), "down.bias": (b,), "up.weight": (1, b), "up.bias": (1,)}
        for layer in self.layers:
            if not 0 <= layer < self.model.num_layers - 1:
                raise TideConfigError(f"{path} places a router at layer {layer}, outside 0..{self.model.num_layers - 2} "
                                      f"(the final layer is never a checkpoint); recalibrate it.")
            for kind, params in (("router", self.routers[layer]), ("drafting router", self.draft_routers.get(layer))):
                for n, shape in want.items() if params is not None else ():
                    if tuple(params[n].shape) != shape:
                        raise TideConfigError(f"{path}: {kind} {layer} {n} has shape {tuple(params[n].shape)}, "
                                              f"expected {shape}; the file is damaged, recalibrate it.")
            problem = self.projections[layer].check(d) if layer in self.projections else None
            if problem:
                raise TideConfigError(f"{path}: the exit projection at layer {layer} is invalid ({problem}); "
                                      f"the file is damaged, recalibrate it.")

    def check_model(self, model: ModelIdentity, path: str) -> None:
        """Refuse a router calibrated for another model, with one sentence."""
        mine = self.model
        for attr, label in (("num_layers", "layers"), ("hidden_size", "hidden size"), ("vocab_size", "vocabulary")):
            if getattr(mine, attr) != getattr(model, attr):
                raise TideConfigError(
                    f"The TIDE router {path} was calibrated for a model with {getattr(mine, attr)} {label}, "
                    f"but this model has {getattr(model, attr)}; calibrate a router for this model with "
                    f"calibration/calibrate.py.")
        if mine.fingerprint and model.fingerprint and mine.fingerprint != model.fingerprint:
            raise TideConfigError(
                f"The TIDE router {path} was calibrated for a different model (fingerprint {mine.fingerprint} "
                f"vs {model.fingerprint}); calibrate a router for this model with calibration/calibrate.py.")

    def router_module(self, layer: int, drafting: bool = False):
        from .router import Router
        r = Router(self.model.hidden_size, self.bottleneck)
        r.load_state_dict((self.draft_routers if drafting else self.routers)[layer])
        return r
