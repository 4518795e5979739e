"""TIDE variants of vLLM's model classes: each family is its stock class plus an adapter.

When TIDE is not asked for, constructing a TIDE class returns an instance of the stock class itself,
so installing the plugin changes nothing.
"""
from __future__ import annotations

import logging

from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.granite import GraniteForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from .checkpoint import OFF, RouterCheckpoint
from .compiled_layers import SegmentRunner
from .engine import (DecoderAdapter, EarlyExitEngine, Gemma3Adapter, GraniteAdapter, MistralAdapter, Qwen2Adapter,
                     Qwen3Adapter)
from .plugin import patch_worker
from .settings import TideSettings

logger = logging.getLogger("vllm.tide")


def _is_draft_model(vllm_config) -> bool:
    """Whether the model being built is a speculative-decoding draft model: vLLM builds it from the
    target's engine config (TIDE settings included) with the draft's model config, runner "draft"."""
    return getattr(vllm_config.model_config, "runner_type", None) == "draft"


def _tide_variant(base: type, adapter: DecoderAdapter) -> type:
    class TideVariant(base):
        def __new__(cls, *, vllm_config, prefix: str = ""):
            if TideSettings.from_vllm_config(vllm_config) is None:
                return base(vllm_config=vllm_config, prefix=prefix)
            if _is_draft_model(vllm_config):      # the router belongs to the target model
                logger.info("TIDE: the speculative-decoding draft model %s runs stock.",
                            vllm_config.model_config.model)
                return base(vllm_config=vllm_config, prefix=prefix)
            return super().__new__(cls)

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            settings = TideSettings.from_vllm_config(vllm_config)
            ckpt = RouterCheckpoint.load(settings.router)   # loaded once: the file may go away later
            threshold, min_layer = settings.resolve(ckpt)
            lora = vllm_config.lora_config is not None
            self.tide = EarlyExitEngine(ckpt, threshold, min_layer, adapter, SegmentRunner.for_engine(vllm_config),
                                        lora=lora, split_rule=(settings.split_min_rows, settings.split_min_fraction))
            if lora:
                logger.info("TIDE with LoRA: the routers were calibrated on the base model, so check quality "
                            "with your adapters; partial layers compute every row under LoRA.")
            self.tide_counters = self.tide.counters
            patch_worker()
            if threshold >= OFF:
                logger.info("TIDE early exit on %s: router %s, whose %s keeps exits off (calibration found no "
                            "operating point that meets its quality bar and saves more than its checkpoints cost), so "
                            "requests run stock vLLM's forward unless they set tide_threshold; see the router's "
                            "calibration report.", base.__name__, settings.router,
                            f"preset {settings.preset!r}" if settings.preset else "default")
            else:
                logger.info("TIDE early exit on %s: router %s, threshold %s, min layer %d, checkpoints %s",
                            base.__name__, settings.router, threshold, min_layer, self.tide.layers)

        def load_weights(self, weights):
            loaded = super().load_weights(weights)
            self.tide.prepare(self)
            return loaded

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            return self.tide.forward(self, input_ids, positions, inputs_embeds)

    TideVariant.__name__ = TideVariant.__qualname__ = f"Tide{base.__name__}"
    return TideVariant


TideLlamaForCausalLM = _tide_variant(LlamaForCausalLM, DecoderAdapter())
TideMistralForCausalLM = _tide_variant(MistralForCausalLM, MistralAdapter())
TideQwen2ForCausalLM = _tide_variant(Qwen2ForCausalLM, Qwen2Adapter())
TideQwen3ForCausalLM = _tide_variant(Qwen3ForCausalLM, Qwen3Adapter())
# vLLM runs Phi-3 on its Llama layers (fused q/k/v and gate/up are what they load anyway)
TidePhi3ForCausalLM = _tide_variant(Phi3ForCausalLM, DecoderAdapter())
TideGraniteForCausalLM = _tide_variant(GraniteForCausalLM, GraniteAdapter())
TideGemma3ForCausalLM = _tide_variant(Gemma3ForCausalLM, Gemma3Adapter())
