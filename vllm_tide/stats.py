"""Exit statistics, counted in the worker where the layers run and read through vLLM's RPC."""
from __future__ import annotations

import torch


# what happened to the token-layers after a token's exit
KINDS = ("skipped", "partial")


class ExitCounters:
    """Counts exactly what was not computed. Only real steps count (not warm-up or dummy runs)."""

    def __init__(self, layers: list[int], num_layers: int):
        self.layers = layers
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.exits = {c: 0 for c in self.layers}
        self.skipped = 0   # token-layers that ran nothing but the K/V fill
        self.partial = 0   # token-layers that ran attention (for their K/V) but skipped the rest
        self.deferred = 0  # exits that fired but were not taken, since they would have saved nothing (engine._take)

    def snapshot(self) -> dict:
        return with_fractions({"tokens": self.tokens, "exits_per_layer": dict(self.exits),
                               "deferred_exits": self.deferred,
                               **{f"{kind}_token_layers": getattr(self, kind) for kind in KINDS},
                               "num_layers": self.num_layers})


def with_fractions(snap: dict) -> dict:
    """The snapshot with its skipped and partial token-layers as fractions of all token-layers."""
    full = max(snap["tokens"] * snap["num_layers"], 1)
    return {**snap, **{f"{kind}_layer_fraction": snap[f"{kind}_token_layers"] / full for kind in KINDS}}


def first_rank(snaps: list[dict]) -> dict:
    """One view for the model: under tensor parallelism every rank sees the same tokens and exits,
    so the first rank's counters are taken rather than summed."""
    snaps = [s for s in snaps if s]
    return snaps[0] if snaps else {}


def sum_engines(snaps: list[dict]) -> dict:
    """One view over data-parallel engines (each a model replica with its own tokens): the sums."""
    snaps = [s for s in snaps if s]
    if not snaps:
        return {}
    out = dict(snaps[0])
    for key in ("tokens", "deferred_exits", *(f"{kind}_token_layers" for kind in KINDS)):
        out[key] = sum(s[key] for s in snaps)
    out["exits_per_layer"] = {layer: sum(s["exits_per_layer"][layer] for s in snaps) for layer in out["exits_per_layer"]}
    return with_fractions(out)


def _worker_snapshot(model: torch.nn.Module) -> dict:
    counters = getattr(model, "tide_counters", None)
    if counters is None:
        return {}
    engine = model.tide
    return {**counters.snapshot(), "threshold": engine.threshold, "min_layer": engine.min_layer}


# Worker methods, installed on vLLM's WorkerBase when a TIDE model is built (plugin.patch_worker), so
# that collective_rpc can call them by name: an engine in its own process (vLLM's default, offline
# too) only accepts functions with insecure serialization turned on.
SNAPSHOT_RPC = "tide_exit_stats"
RESET_RPC = "tide_reset_exit_stats"


def worker_exit_stats(worker) -> dict:
    return _worker_snapshot(worker.get_model())


def worker_reset_exit_stats(worker) -> None:
    counters = getattr(worker.get_model(), "tide_counters", None)
    if counters is not None:
        counters.reset()


def _tide_on(llm) -> bool:
    from .settings import TideSettings
    return TideSettings.from_vllm_config(llm.llm_engine.vllm_config) is not None


def exit_stats(llm) -> dict:
    """TIDE exit statistics of an offline ``vllm.LLM``: tokens, exits_per_layer, deferred_exits, skipped
    and partial layer fractions. Empty when TIDE is not active in that engine."""
    return first_rank(llm.collective_rpc(SNAPSHOT_RPC)) if _tide_on(llm) else {}


def reset_exit_stats(llm) -> None:
    if _tide_on(llm):
        llm.collective_rpc(RESET_RPC)
