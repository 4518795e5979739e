"""TIDE settings from ``additional_config["tide"]`` (offline) or the ``--tide-*`` flags (served)."""
from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import OFF, RouterCheckpoint, check_threshold
from .errors import TideConfigError

# (split_min_rows, split_min_fraction) unless set; see TideSettings
DEFAULT_SPLIT_RULE = (16, 0.25)
# settings that take every exit that fires, as for a single decode token: the per-token behaviour that
# calibration and the reference simulator assume (quality benchmarks, tests comparing batches with it)
EVERY_EXIT = {"split_min_rows": 1, "split_min_fraction": 0.0}

KNOWN_KEYS = {"router", "threshold", "min_layer", "enabled", "preset", "split_min_rows", "split_min_fraction",
              "request_exits"}


@dataclass(frozen=True)
class TideSettings:
    router: str
    threshold: float | None = None   # None: the checkpoint's suggested threshold
    min_layer: int | None = None     # None: the checkpoint's suggested minimum exit depth
    enabled: bool = True
    preset: str | None = None        # a named operating point stored in the checkpoint (default/balanced/fast)
    # Exits that leave rows of a step running are taken only when at least this many rows and this
    # fraction of the step have exited (engine._take): the rest then runs as partial layers on fewer
    # rows. Below that nothing would be saved, so the exits are deferred. The defaults were measured on
    # a CPU (benchmarks/split_rule.py); the break-even differs on a GPU.
    split_min_rows: int = DEFAULT_SPLIT_RULE[0]
    split_min_fraction: float = DEFAULT_SPLIT_RULE[1]
    # False where exits are off for the whole engine with CUDA graphs on (plugin._decide_cuda_graphs):
    # a request's own tide_threshold is then refused
    request_exits: bool = True

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "TideSettings | None":
        """None when TIDE was not asked for (or is explicitly disabled): the stock forward path."""
        extra = getattr(vllm_config, "additional_config", None) or {}
        raw = extra.get("tide") if isinstance(extra, dict) else None
        if raw is None:
            return None
        s = cls.parse(raw)
        return s if s.enabled else None

    @classmethod
    def parse(cls, raw) -> "TideSettings":
        if not isinstance(raw, dict):
            raise TideConfigError(f'additional_config["tide"] must be a dict like {{"router": PATH}}, got {raw!r}.')
        unknown = set(raw) - KNOWN_KEYS
        if unknown:
            raise TideConfigError(f"Unknown TIDE setting(s) {sorted(unknown)}; known settings are {sorted(KNOWN_KEYS)}.")
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise TideConfigError(f'The TIDE setting "enabled" must be true or false, got {enabled!r}.')
        router = raw.get("router")
        if enabled and not (isinstance(router, str) and router):
            raise TideConfigError('TIDE needs a router checkpoint: set additional_config={"tide": {"router": PATH}} '
                                  "or --tide-router PATH (make one with calibration/calibrate.py).")
        threshold = raw.get("threshold")
        if threshold is not None:
            threshold = check_threshold(threshold)
        min_layer = raw.get("min_layer")
        if min_layer is not None and (isinstance(min_layer, bool) or not isinstance(min_layer, int) or min_layer < 0):
            raise TideConfigError(f"The TIDE min_layer must be a non-negative layer index, got {min_layer!r}.")
        preset = raw.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise TideConfigError(f"The TIDE preset must be a name like \"balanced\", got {preset!r}.")
        rows = raw.get("split_min_rows", cls.split_min_rows)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise TideConfigError(f"The TIDE split_min_rows must be a whole number of rows, at least 1, got {rows!r}.")
        fraction = raw.get("split_min_fraction", cls.split_min_fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise TideConfigError(f"The TIDE split_min_fraction must be a number in [0, 1], got {fraction!r}.")
        request_exits = raw.get("request_exits", True)
        if not isinstance(request_exits, bool):
            raise TideConfigError(f'The TIDE setting "request_exits" must be true or false, got {request_exits!r}.')
        return cls(router=router or "", threshold=threshold, min_layer=min_layer, enabled=enabled, preset=preset,
                   split_min_rows=rows, split_min_fraction=float(fraction), request_exits=request_exits)

    def resolve(self, ckpt: RouterCheckpoint) -> tuple[float, int]:
        """Threshold and minimum exit depth in force: explicit settings win over a preset, which wins
        over the checkpoint's suggestion. A preset or suggestion of exits off (calibration found no
        point that meets its bar and pays for its checkpoints) gives OFF: stock vLLM's forward, without
        the routers, for every request that does not set its own threshold."""
        base_t, base_m = ckpt.suggested_threshold, ckpt.suggested_min_layer
        if self.preset is not None:
            presets = ckpt.extra.get("presets") or {}
            if self.preset not in presets:
                raise TideConfigError(f"The TIDE router {self.router} has no preset {self.preset!r}; it has "
                                      f"{sorted(presets) or 'none (recalibrate with this vllm-tide)'}.")
            p = presets[self.preset]
            # a preset no paying point met keeps exits off, like a suggestion of 1.0
            base_t, base_m = (1.0, ckpt.layers[-1]) if p is None else (p["threshold"], p["min_layer"])
        if self.threshold is not None:
            threshold = self.threshold
        else:
            threshold = OFF if base_t >= 1.0 else check_threshold(base_t)
        min_layer = self.min_layer if self.min_layer is not None else base_m
        if min_layer >= ckpt.model.num_layers:
            raise TideConfigError(f"The TIDE min_layer {min_layer} is not below the model's {ckpt.model.num_layers} "
                                  f"layers; use a checkpoint layer from {ckpt.layers}.")
        return threshold, min_layer
