"""Timing forwards on the very same steps, in one engine (forward_overhead.py, split_rule.py).

On every real step the TIDE model class runs stock's compiled model forward (``model.model(...)``, the
exact forward stock vLLM runs) and TIDE's forward under each variant, in random order, timing each;
TIDE's output under its own settings drives generation. Scheduler, sampling and detokenisation are
outside every timer, which isolates the forward with far less noise than two engines side by side.
"""
from __future__ import annotations

import random
import time
from typing import Callable

STOCK = "stock"


class SameSteps:
    """``variants``: name -> function(engine) that configures the engine before its timed forward
    (None: as it is); the engine's own configuration is restored after each. Off until ``on`` is set,
    so warm-up runs are not timed."""

    def __init__(self, llm, variants: dict[str, Callable | None], seed: int = 0):
        self.variants = variants
        self.times: dict[str, list[float]] = {STOCK: [], **{name: [] for name in variants}}
        self.on = False
        self._rng = random.Random(seed)
        llm.apply_model(self._instrument)

    def clear(self) -> None:
        for v in self.times.values():
            v.clear()

    def _instrument(self, lm) -> bool:
        from vllm_tide.engine import _real_step
        engine = lm.tide

        def forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            tide = lambda: engine.forward(lm, input_ids, positions, inputs_embeds)  # noqa: E731
            if not self.on or not _real_step()[0]:
                return tide()
            order = [STOCK, *self.variants]
            self._rng.shuffle(order)        # none always first after the scheduler, none always last
            saved, own = dict(vars(engine)), None
            for name in order:
                configure = self.variants.get(name)
                if configure is not None:
                    configure(engine)
                t0 = time.perf_counter()
                out = lm.model(input_ids, positions, None, inputs_embeds) if name == STOCK else tide()
                self.times[name].append(time.perf_counter() - t0)
                vars(engine).update(saved)
                if name != STOCK and configure is None:
                    own = out
            return own if own is not None else tide()

        lm.forward = forward
        return True
