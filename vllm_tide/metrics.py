"""TIDE series on the server's Prometheus ``/metrics``, correct in vLLM's multiprocess mode.

The counters live where the layers run (the worker, in the engine-core process by default). The API
server asks for them over vLLM's own worker RPC (``collective_rpc("tide_exit_stats")``) right
before each scrape, and a Prometheus collector renders the answer, named like vLLM's own series:

    vllm:tide_tokens_total                   tokens that went through the TIDE forward
    vllm:tide_exits_total{layer="15"}         tokens that exited at each checkpoint layer
    vllm:tide_skipped_token_layers_total      token-layers not computed at all (K/V fill only)
    vllm:tide_partial_token_layers_total      token-layers that ran only attention (for their K/V)
    vllm:tide_deferred_exits_total            exits not taken because they would have saved nothing in their step
    vllm:tide_threshold                       the engine's exit threshold (per request overrides aside; 2 = exits off)
    vllm:tide_min_layer                       the shallowest layer a token may exit at
"""
from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .stats import SNAPSHOT_RPC, first_rank, sum_engines

logger = logging.getLogger("vllm.tide")


class TideCollector:
    """Renders the latest snapshot fetched from the engine."""

    def __init__(self):
        self.snapshot: dict = {}
        self.model_name = ""

    def collect(self):
        s = self.snapshot
        if not s:
            return
        labels = ["model_name"]
        name = [self.model_name]

        def counter(metric, doc, value):
            c = CounterMetricFamily(metric, doc, labels=labels)
            c.add_metric(name, value)
            return c

        yield counter("vllm:tide_tokens", "Tokens processed by the TIDE early-exit forward.", s["tokens"])
        exits = CounterMetricFamily("vllm:tide_exits", "Tokens that exited at each TIDE checkpoint layer.",
                                    labels=labels + ["layer"])
        for layer, count in sorted(s["exits_per_layer"].items(), key=lambda kv: int(kv[0])):
            exits.add_metric(name + [str(layer)], count)
        yield exits
        yield counter("vllm:tide_skipped_token_layers", "Token-layers skipped entirely (K/V fill only).",
                      s["skipped_token_layers"])
        yield counter("vllm:tide_partial_token_layers",
                      "Token-layers of exited tokens that ran attention only (for their K/V).",
                      s["partial_token_layers"])
        yield counter("vllm:tide_deferred_exits",
                      "Router decisions to exit not taken, since they would have saved nothing in their step.",
                      s["deferred_exits"])
        for metric, doc, key in (("vllm:tide_threshold",
                                  "The engine's TIDE exit threshold (2 when the router's setting keeps exits off).",
                                  "threshold"),
                                 ("vllm:tide_min_layer", "The shallowest layer a token may exit at.", "min_layer")):
            g = GaugeMetricFamily(metric, doc, labels=labels)
            g.add_metric(name, s[key])
            yield g


COLLECTOR = TideCollector()
_OWN_REGISTRY = CollectorRegistry(auto_describe=False)    # the TIDE series alone, for the multiprocess answer
_OWN_REGISTRY.register(COLLECTOR)


async def _with_tide_series(response):
    """With several API servers (--api-server-count > 1, the default under data parallelism) vLLM sets
    PROMETHEUS_MULTIPROC_DIR, and its /metrics handler then renders only the series other processes
    wrote to that folder, not the registry the collector is in. Append the TIDE series to that answer
    (each API server reads the engine's counters before the scrape, so any of them answers alike)."""
    from starlette.responses import Response
    if response.headers.get("content-encoding"):      # compressed: leave it as vLLM made it
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    if b"vllm:tide_tokens_total" not in body:
        body += generate_latest(_OWN_REGISTRY)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers)


class TideEndpointPlugin:
    """vLLM endpoint plugin: fetches the TIDE counters before every /metrics scrape. It adds no route."""

    name = "tide"
    required_tasks = ("generate",)

    def __init__(self):
        self.engine_client = None

    def attach_router(self, app) -> None:
        plugin = self

        @app.middleware("http")
        async def refresh_tide_metrics(request, call_next):
            if not request.url.path.startswith("/metrics"):
                return await call_next(request)
            await plugin.refresh()
            response = await call_next(request)
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and response.status_code == 200:
                response = await _with_tide_series(response)
            return response

    async def init_state(self, engine_client, state, args) -> None:
        from .settings import TideSettings
        if engine_client is None or TideSettings.from_vllm_config(engine_client.vllm_config) is None:
            return
        self.engine_client = engine_client
        COLLECTOR.model_name = engine_client.vllm_config.model_config.served_model_name
        await self.refresh()

    async def refresh(self) -> None:
        if self.engine_client is None:
            return
        # collective_rpc answers for the first data-parallel engine only; ask every engine this client
        # manages (one without data parallelism)
        every_engine = getattr(getattr(self.engine_client, "engine_core", None), "call_utility_all_async", None)
        try:
            if every_engine is not None:
                per_engine = await every_engine("collective_rpc", SNAPSHOT_RPC, 10, (), None)
            else:
                per_engine = [await self.engine_client.collective_rpc(SNAPSHOT_RPC, timeout=10)]
        except Exception as e:  # a scrape must not fail because the engine is busy or gone
            logger.warning("TIDE metrics: could not read the exit counters from the engine (%s)", e)
            return
        # tensor-parallel ranks of an engine see the same tokens (the first is taken); engines add up
        snapshot = sum_engines([first_rank(workers) for workers in per_engine])
        if snapshot:
            COLLECTOR.snapshot = snapshot


def register_collector(registry) -> None:
    """Add the TIDE collector to the registry vLLM serves /metrics from (once)."""
    if getattr(registry, "_tide_registered", False):
        return
    registry.register(COLLECTOR)
    registry._tide_registered = True
