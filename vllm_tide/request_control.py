"""Per-request exit control through the standard API.

A request sets its own threshold, or turns exits off, with ``SamplingParams(extra_args=...)``
offline or ``"vllm_xargs"`` in an OpenAI-compatible request body:

    {"tide_threshold": 0.95}      # this request's exit threshold, in (0, 1]
    {"tide_enabled": false}       # this request never exits (stock computation for its tokens)

(vLLM's OpenAI server types ``vllm_xargs`` values as str/int/float, so a JSON false arrives as 0;
0 and 1 are accepted for ``tide_enabled``.)

- Front-end: the parameters are validated before the request reaches the engine (a bad value is a
  400 with one sentence), and every request's prefix-cache salt is keyed by its exit setting,
  because propagated K/V depend on it: blocks computed under one setting are never reused under
  another.
- Worker: before each step, the model runner's requests are mapped to a per-token threshold
  vector that the early-exit engine applies row by row.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .checkpoint import OFF

logger = logging.getLogger("vllm.tide")

THRESHOLD_KEY = "tide_threshold"
ENABLED_KEY = "tide_enabled"
KEYS = (THRESHOLD_KEY, ENABLED_KEY)


def _error(message: str, parameter: str, value):
    from vllm.exceptions import VLLMValidationError
    return VLLMValidationError(message, parameter=parameter, value=value)


def request_threshold(extra_args: dict | None, validate: bool = False) -> float | None:
    """This request's own threshold (OFF for exits off), or None for the engine's setting."""
    if not extra_args:
        return None
    if validate:
        unknown = [k for k in extra_args if k.startswith("tide_") and k not in KEYS]
        if unknown:
            raise _error(f"Unknown TIDE request parameter {unknown[0]!r}; use {THRESHOLD_KEY} (a number in (0, 1]) "
                         f"or {ENABLED_KEY} (true/false).", unknown[0], extra_args[unknown[0]])
    enabled = extra_args.get(ENABLED_KEY, True)
    threshold = extra_args.get(THRESHOLD_KEY)
    if validate:
        if not (isinstance(enabled, bool) or (isinstance(enabled, int) and enabled in (0, 1))):
            raise _error(f"{ENABLED_KEY} must be true or false (or 1/0), got {enabled!r}.", ENABLED_KEY, enabled)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 < float(threshold) <= 1.0):
            raise _error(f"{THRESHOLD_KEY} must be a number in (0, 1] (1.0 never exits), got {threshold!r}.",
                         THRESHOLD_KEY, threshold)
    if not enabled:
        return OFF
    return None if threshold is None else float(threshold)


def move_top_level_fields(body) -> None:
    """tide_* fields at the top level of a served request body (pydantic extras) into its vllm_xargs,
    where the checks below apply to them; the same field in both places is one clear error."""
    extra = getattr(body, "model_extra", None) or {}
    fields = {k: v for k, v in extra.items() if k.startswith("tide_")}
    if not fields:
        return
    xargs = dict(body.vllm_xargs or {})
    twice = [k for k in fields if k in xargs]
    if twice:
        raise _error(f"{twice[0]} is given both at the top level of the request and in vllm_xargs; give it once.",
                     twice[0], fields[twice[0]])
    body.vllm_xargs = {**xargs, **fields}
    for k in fields:
        del extra[k]


def cache_salt(user_salt: str | None, own: float | None) -> str:
    """Prefix-cache salt for a request under TIDE: its exit setting, plus any salt it brought."""
    tag = "tide:default" if own is None else ("tide:off" if own >= OFF else f"tide:{own!r}")
    return tag if not user_salt else f"{user_salt}|{tag}"


# ----------------------------------------------------------------------------- front-end

def check_and_salt(processor, params, request) -> None:
    """Called on every EngineCoreRequest the front-end builds (after vLLM's own checks)."""
    from .settings import TideSettings
    extra = getattr(params, "extra_args", None)
    settings = getattr(processor, "_tide_settings", False)
    if settings is False:       # the engine's settings do not change: parse them once per processor
        settings = processor._tide_settings = TideSettings.from_vllm_config(processor.vllm_config)
    tide_on = settings is not None
    has_tide_args = bool(extra) and any(k.startswith("tide_") for k in extra)
    if not tide_on:
        if has_tide_args:
            raise _error("This engine does not run TIDE early exit, so tide_* request parameters cannot apply; "
                         "start it with --plugin tide --tide-router PATH.", next(k for k in extra if k.startswith("tide_")),
                         None)
        return
    own = request_threshold(extra, validate=True)
    if own is not None and own < OFF and not settings.request_exits:
        raise _error("This server runs TIDE with exits off and CUDA graphs on (its router's default keeps exits off), "
                     "so a request cannot turn exits on; start it with --tide-threshold or --tide-preset to allow "
                     "exits.", THRESHOLD_KEY, own)
    request.cache_salt = cache_salt(request.cache_salt, own)


# ----------------------------------------------------------------------------- worker

def step_thresholds(runner, num_scheduled_tokens: np.ndarray, default: float) -> tuple[torch.Tensor | None, float]:
    """(per-token thresholds for this step or None when every request uses the engine's, the minimum)."""
    num_reqs = len(num_scheduled_tokens)
    own = []
    for req_id in runner.input_batch.req_ids[:num_reqs]:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        own.append(request_threshold(getattr(params, "extra_args", None)))
    if all(t is None for t in own):
        return None, default
    per_req = np.array([default if t is None else t for t in own], dtype=np.float32)
    per_token = np.repeat(per_req, num_scheduled_tokens)
    return torch.from_numpy(per_token).to(runner.device), float(per_req.min())
