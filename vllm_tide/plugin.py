"""vLLM plugin entry point (``vllm.general_plugins`` -> ``tide``).

It runs in every vLLM process. It registers the TIDE model classes (inert unless TIDE is asked for),
adds the ``--plugin tide --tide-*`` serve flags, checks a TIDE request in the front-end process before
any worker starts (bad input fails fast with one sentence), and installs the per-request controls
(request_control) and, in an API server running TIDE, the /metrics series (metrics).
"""
from __future__ import annotations

import logging
import sys

from .errors import TideConfigError

logger = logging.getLogger("vllm.tide")

SUPPORTED = {
    "LlamaForCausalLM": "TideLlamaForCausalLM",
    "MistralForCausalLM": "TideMistralForCausalLM",
    "Qwen2ForCausalLM": "TideQwen2ForCausalLM",
    "Qwen3ForCausalLM": "TideQwen3ForCausalLM",
    "Phi3ForCausalLM": "TidePhi3ForCausalLM",
    "GraniteForCausalLM": "TideGraniteForCausalLM",
    "Gemma3ForCausalLM": "TideGemma3ForCausalLM",
}
_PATCHED = "_vllm_tide_patched"


def register() -> None:
    from vllm import ModelRegistry
    for arch, cls in SUPPORTED.items():
        ModelRegistry.register_model(arch, f"vllm_tide.models:{cls}")
    _patch_engine_args()
    _patch_request_path()
    _install_excepthook()


# ----------------------------------------------------------------------------- CLI flags

def add_tide_cli_args(parser):
    if any("--tide-router" in a.option_strings for a in parser._actions):
        return parser
    g = parser.add_argument_group("TIDE early exit (vllm-tide)")
    g.add_argument("--plugin", action="append", default=None, metavar="NAME",
                   help="Enable a vllm-tide plugin; `--plugin tide` turns on per-token early exit.")
    g.add_argument("--tide-router", default=None, metavar="PATH", help="TIDE router checkpoint (.safetensors).")
    g.add_argument("--tide-threshold", type=float, default=None, metavar="T",
                   help="Exit threshold in (0, 1]; default: the checkpoint's suggested threshold.")
    g.add_argument("--tide-min-layer", type=int, default=None, metavar="N",
                   help="Shallowest layer a token may exit at; default: the checkpoint's suggestion.")
    g.add_argument("--tide-preset", default=None, metavar="NAME",
                   help="A named operating point stored in the router: default, balanced or fast.")
    g.add_argument("--tide-split-min-rows", type=int, default=None, metavar="N",
                   help="In a step that keeps rows running, take exits only once at least N rows (and "
                        "--tide-split-min-fraction of the step) exit; fewer would save nothing. Default 16.")
    g.add_argument("--tide-split-min-fraction", type=float, default=None, metavar="F",
                   help="See --tide-split-min-rows; a fraction in [0, 1]. Default 0.25.")
    return parser


def tide_config_from_args(args) -> dict | None:
    plugins = getattr(args, "plugin", None) or []
    unknown = [p for p in plugins if p != "tide"]
    if unknown:
        raise TideConfigError(f"Unknown --plugin {unknown[0]!r}; the only plugin vllm-tide provides is `--plugin tide`.")
    flags = {"router": getattr(args, "tide_router", None), "threshold": getattr(args, "tide_threshold", None),
             "min_layer": getattr(args, "tide_min_layer", None), "preset": getattr(args, "tide_preset", None),
             "split_min_rows": getattr(args, "tide_split_min_rows", None),
             "split_min_fraction": getattr(args, "tide_split_min_fraction", None)}
    given = {k: v for k, v in flags.items() if v is not None}
    if not plugins:
        if given:
            raise TideConfigError("--tide-* flags need `--plugin tide` to turn TIDE on; add it to the command.")
        return None
    if "router" not in given:
        raise TideConfigError("`--plugin tide` needs a router checkpoint: add --tide-router PATH "
                              "(make one with calibration/calibrate.py).")
    return given


# ----------------------------------------------------------------------------- front-end checks

def check_request(engine_args) -> bool:
    """Validate a TIDE request against the model's files and settings; turn CUDA graphs off and pin the
    V1 model runner. Returns whether TIDE is on."""
    from .checkpoint import OFF, RouterCheckpoint
    from .fingerprint import model_identity, resolve_model_dir
    from .settings import TideSettings
    raw = (engine_args.additional_config or {}).get("tide") if isinstance(engine_args.additional_config, dict) else None
    if raw is None:
        return False
    settings = TideSettings.parse(raw)
    if not settings.enabled:
        return False
    model_dir = resolve_model_dir(engine_args.model)
    if model_dir is None:
        raise TideConfigError(f"TIDE cannot find the files of model {engine_args.model!r} locally; download it "
                              f"first or pass a local folder.")
    identity = model_identity(model_dir)
    if identity.architecture not in SUPPORTED:
        raise TideConfigError(f"TIDE does not support the {identity.architecture} architecture; supported are "
                              f"{', '.join(SUPPORTED)} (drop the TIDE settings to run this model stock).")
    if engine_args.quantization or _quantized(model_dir):
        raise TideConfigError("TIDE does not support quantized weights yet; use an unquantized (fp32/fp16/bf16) "
                              "checkpoint or drop the TIDE settings.")
    if str(engine_args.kv_cache_dtype or "auto").startswith("fp8"):
        raise TideConfigError("TIDE does not support an fp8 KV cache yet; use --kv-cache-dtype auto.")
    if (engine_args.pipeline_parallel_size or 1) > 1:
        raise TideConfigError("TIDE does not support pipeline parallelism; use tensor parallelism or one device.")
    ckpt = RouterCheckpoint.load(settings.router)
    ckpt.check_model(identity, settings.router)
    threshold, min_layer = settings.resolve(ckpt)
    if _decide_cuda_graphs(engine_args, exits_off=threshold >= OFF):
        # exits stay off for every request, so the workers and the front-end must refuse to turn them on
        engine_args.additional_config = {**engine_args.additional_config, "tide": {**raw, "request_exits": False}}
    _pin_v1_model_runner()
    logger.info("TIDE request checked: router %s, threshold %s, min layer %d", settings.router,
                "off (the router's setting)" if threshold >= OFF else threshold, min_layer)
    return True


V1_RUNNER_ONLY = ("TIDE runs on vLLM's V1 model runner (its per-request exit settings are applied there); "
                  "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0.")


def _pin_v1_model_runner() -> None:
    """vLLM 0.32 picks Model Runner V2 by default wherever Triton exists (CUDA machines). TIDE's worker
    hook lives in the V1 runner; under V2, requests asking for exits off would silently exit. So TIDE
    pins V1 through vLLM's own switch (read again in every worker process), unless the user asked for V2."""
    import os
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if value is not None and value.strip().lstrip("-").isdigit() and int(value) != 0:   # vLLM's bool(int(...))
        raise TideConfigError(V1_RUNNER_ONLY)
    if value is None:
        from vllm import envs
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        envs.disable_envs_cache()      # an earlier engine in this process may have cached the unset value
        logger.info("TIDE: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0 for this process).")


def _decide_cuda_graphs(engine_args, exits_off: bool = False, platform=None) -> bool:
    """A CUDA graph would freeze one path through TIDE's exit branches, so graphs are turned off, except
    where TIDE resolves to exits off: then every step runs stock's forward, CUDA graphs stay as the user
    set them (turning them off would make TIDE slower than stock vLLM for nothing), and requests may not
    turn exits on. Returns whether exits are locked off that way.

    torch.compile stays as the user set it: runs of layers between checkpoints are compiled (compiled_layers).
    """
    from vllm.config import CompilationConfig, CUDAGraphMode
    if engine_args.enforce_eager:
        return False
    cc = engine_args.compilation_config
    if isinstance(cc, dict):
        cc = engine_args.compilation_config = CompilationConfig(**cc)
    if cc.cudagraph_mode == CUDAGraphMode.NONE:
        return False
    if platform is None:
        from vllm.platforms import current_platform as platform
    if platform.is_cuda_alike():
        if exits_off:
            logger.warning("TIDE: this router's default keeps exits off (calibration found no point that pays), so "
                           "CUDA graphs stay on and every request runs stock vLLM's forward; a request's "
                           "tide_threshold is refused. Start with --tide-threshold or --tide-preset to allow exits "
                           "(CUDA graphs then turn off).")
            return True
        logger.warning("TIDE: CUDA graphs are off (per-token exits branch at every checkpoint); "
                       "decoder layers still run torch.compiled.")
    cc.cudagraph_mode = CUDAGraphMode.NONE
    return False


# speculative methods whose drafter reads the target's intermediate hidden states
AUX_HIDDEN_STATE_METHODS = ("eagle3", "dflash", "extract_hidden_states")


def check_engine_config(config) -> None:
    """What only the built config tells (vLLM resolves some choices itself, e.g. the speculative method
    from the draft model's name)."""
    if config.use_v2_model_runner:     # a feature that needs V2 (watermarking, HiSparse)
        raise TideConfigError("TIDE runs on vLLM's V1 model runner, but this configuration needs Model "
                              "Runner V2 (watermarking or HiSparse attention); drop that feature or TIDE.")
    if config.model_config.runner_type != "generate":
        raise TideConfigError(f"TIDE early exit is for text generation (its routers and exit projections are "
                              f"calibrated on next-token predictions), not the {config.model_config.runner_type} "
                              f"runner; drop the TIDE settings for this model.")
    spec = config.speculative_config
    if spec is not None and spec.method in AUX_HIDDEN_STATE_METHODS:
        raise TideConfigError(f"TIDE does not support {spec.method} speculative decoding (its drafter reads "
                              f"hidden states of layers that exited tokens skip); use eagle (EAGLE-1), "
                              f"draft_model or ngram speculation, or drop TIDE.")


def _quantized(model_dir: str) -> bool:
    import json
    import os
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return "quantization_config" in json.load(f)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- hooks into vLLM

def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext
    if getattr(EngineArgs, _PATCHED, False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add_cli_args(parser, *a, **kw):
        return add_tide_cli_args(orig_add(parser, *a, **kw))

    def from_cli_args(cls, args):
        engine_args = orig_from(cls, args)
        tide = tide_config_from_args(args)
        if tide is not None:
            engine_args.additional_config = {**(engine_args.additional_config or {}), "tide": tide}
            # Extra API-server processes (--api-server-count > 1, the default under data parallelism) get
            # this namespace and rebuild their engine args from it before they load any plugin, i.e.
            # with vLLM's own from_cli_args, which knows nothing of --tide-*: carry the settings in
            # the field it does read.
            args.additional_config = engine_args.additional_config
        return engine_args

    def create_engine_config(self, usage_context=None, *a, **kw):
        tide_on = check_request(self)
        config = orig_create(self, usage_context, *a, **kw)
        if usage_context == UsageContext.OPENAI_API_SERVER:
            _patch_request_bodies()       # top-level tide_* fields: applied under TIDE, a 400 without it
        if tide_on:
            check_engine_config(config)
            if usage_context == UsageContext.OPENAI_API_SERVER:
                _patch_api_server()       # this process serves HTTP: add the TIDE /metrics series
        return config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    setattr(EngineArgs, _PATCHED, True)


def _patch_request_path() -> None:
    """Per-request thresholds: validated and cache-salted in the front-end (here), applied in the
    worker (patch_worker, installed when a TIDE model is built)."""
    from vllm.v1.engine.input_processor import InputProcessor

    from . import request_control
    if getattr(InputProcessor, _PATCHED, False):
        return
    orig_process = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *a, **kw):
        request = orig_process(self, request_id, prompt, params, *a, **kw)
        request_control.check_and_salt(self, params, request)
        return request

    InputProcessor.process_inputs = process_inputs
    setattr(InputProcessor, _PATCHED, True)


def patch_worker() -> None:
    """In the worker process: per-step request thresholds for the model, and the stats RPC method."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    from . import request_control, stats
    if getattr(GPUModelRunner, _PATCHED, False):
        return
    orig_prepare = GPUModelRunner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *a, **kw):
        out = orig_prepare(self, scheduler_output, num_scheduled_tokens, *a, **kw)
        engine = getattr(self.get_model(), "tide", None)
        if engine is not None:
            engine.step_thresholds, engine.step_min = request_control.step_thresholds(
                self, num_scheduled_tokens, engine.threshold)
        return out

    GPUModelRunner._prepare_inputs = _prepare_inputs
    setattr(WorkerBase, stats.SNAPSHOT_RPC, stats.worker_exit_stats)
    setattr(WorkerBase, stats.RESET_RPC, stats.worker_reset_exit_stats)
    setattr(GPUModelRunner, _PATCHED, True)


def _patch_request_bodies() -> None:
    """A served request may put tide_threshold / tide_enabled at the top level of its body, where
    vLLM's own extras (top_k, ...) go: vLLM would ignore them silently (its request models allow extra
    fields), so they are moved into vllm_xargs, where the per-request checks see them."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from . import request_control
    for cls in (CompletionRequest, ChatCompletionRequest):
        if getattr(cls, _PATCHED, False):
            continue
        orig = cls.to_sampling_params

        def to_sampling_params(self, *a, _orig=orig, **kw):
            request_control.move_top_level_fields(self)
            return _orig(self, *a, **kw)

        cls.to_sampling_params = to_sampling_params
        setattr(cls, _PATCHED, True)


def _patch_api_server() -> None:
    """Attach the TIDE metrics (an endpoint plugin without routes) to the app vLLM is about to build."""
    from vllm.entrypoints.launchers import app as app_mod
    from vllm.entrypoints.serve.instrumentator import metrics as metrics_mod

    from .metrics import TideEndpointPlugin, register_collector
    if getattr(app_mod, _PATCHED, False):
        return
    orig_attach = app_mod.attach_endpoint_plugins
    orig_registry = metrics_mod.get_prometheus_registry

    def attach_endpoint_plugins(app, supported_tasks):
        orig_attach(app, supported_tasks)
        plugin = TideEndpointPlugin()
        plugin.attach_router(app)
        app.state.endpoint_plugins = list(getattr(app.state, "endpoint_plugins", [])) + [plugin]

    def get_prometheus_registry():
        registry = orig_registry()
        register_collector(registry)
        return registry

    app_mod.attach_endpoint_plugins = attach_endpoint_plugins
    metrics_mod.get_prometheus_registry = get_prometheus_registry
    setattr(app_mod, _PATCHED, True)


def _install_excepthook() -> None:
    """Bad TIDE input ends a `vllm serve` with its one sentence, not a traceback through vLLM."""
    previous = sys.excepthook
    if getattr(previous, _PATCHED, False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, TideConfigError):
            print(f"vllm-tide error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    setattr(hook, _PATCHED, True)
    sys.excepthook = hook
