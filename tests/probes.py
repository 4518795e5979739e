"""What the tests read from inside a running engine (in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0).

StepRecorder records each real step's shape from vLLM's own attention metadata (how many tokens each
request brought, how long its sequence is) and how many exits TIDE took in it.

K and V at the exact cache slots of a request, against a reference, for any cache layout: SlotRecorder
records the slots vLLM assigned to each position (from each step's attention metadata);
cache_errors compares every layer's paged cache at those slots with the reference's K and V. The
expected cache is written by the attention backend's own writer, so a packed layout is read as
well as a plain one, and nothing here knows (or shares with the plugin) how a layout is laid out.
"""
import torch


def _wrap_forward(model, record):
    """model.forward calls record(positions, attention metadata by layer name, run) in real steps."""
    from vllm.forward_context import get_forward_context
    forward = model.forward
    names = [layer.self_attn.attn.layer_name for layer in model.model.layers]

    def recorded(input_ids, positions, *args, **kwargs):
        md = get_forward_context().attn_metadata
        run = lambda: forward(input_ids, positions, *args, **kwargs)      # noqa: E731
        if not md:
            return run()
        return record(positions, {n: md[n] if isinstance(md, dict) else md for n in names}, run)
    model.forward = recorded


class StepRecorder:
    """Per real step: (query tokens per request, sequence length per request, exits TIDE took)."""

    def __init__(self):
        self.steps = []

    def install(self, model):
        def record(positions, by_layer, run):
            md = next(iter(by_layer.values()))
            before = sum(model.tide_counters.exits.values())
            out = run()
            n = len(md.seq_lens)
            q = (md.query_start_loc[1:n + 1] - md.query_start_loc[:n]).tolist()
            self.steps.append((q, md.seq_lens[:n].tolist(), sum(model.tide_counters.exits.values()) - before))
            return out
        _wrap_forward(model, record)


class SlotRecorder:
    """Wraps the model's forward to record, for each real step, the positions and the cache slots vLLM
    assigned to them in each layer (the attention metadata's slot mapping: block table x block size +
    offset; layers of different KV cache groups, such as Gemma 3's sliding and global ones, differ)."""

    def __init__(self):
        self.steps = []

    def install(self, model):
        def record(positions, by_layer, run):
            n = next(iter(by_layer.values())).num_actual_tokens
            self.steps.append((positions[:n].clone(), [md.slot_mapping[:n].clone() for md in by_layer.values()]))
            return run()
        _wrap_forward(model, record)

    def slots(self) -> list[dict[int, int]]:
        """Per layer, position -> slot, over every recorded step (one request at a time)."""
        out = None
        for pos, per_layer in self.steps:
            out = out or [{} for _ in per_layer]
            for table, slot in zip(out, per_layer):
                table.update(zip(pos.tolist(), slot.tolist()))
        return out


def cache_errors(llm, ref, seq, slots, block_size: int = 32) -> dict[int, tuple[float, float]]:
    """Per layer: (largest |K - reference K| / largest |reference K|, the same for V) over the
    sequence's positions at their slots. The expected cache is the engine's with the reference's K and
    V written at those slots by the attention backend's own writer; writing ones into zeros the same
    way marks which elements hold K and which hold V. So whatever the layout (blocks first), the
    difference is the error at exactly those slots. Only the blocks the slots are in are copied
    (layers may share one cache tensor of the whole KV space, as Gemma 3's do)."""
    _, _, kv = ref.run(seq)
    assert all(sorted(table) == list(range(len(seq))) for table in slots), [sorted(t) for t in slots]

    def compare(model):
        out = {}
        for li, layer in enumerate(model.model.layers):
            slot = torch.tensor([slots[li][p] for p in range(len(seq))], dtype=torch.int64)
            blocks, local = torch.unique(slot // block_size, return_inverse=True)
            slot = local * block_size + slot % block_size          # the same slots in the blocks' copy
            attn = layer.self_attn.attn
            cache = attn.kv_cache[0] if isinstance(attn.kv_cache, list) else attn.kv_cache
            cache = cache[blocks]                                   # a copy of just those blocks
            k, v = (t.to(cache.dtype) for t in kv[li])
            expected = cache.clone()
            attn.impl.do_kv_cache_update(attn, k, v, expected, slot)
            where_k, where_v = torch.zeros_like(cache), torch.zeros_like(cache)
            attn.impl.do_kv_cache_update(attn, torch.ones_like(k), torch.zeros_like(v), where_k, slot)
            attn.impl.do_kv_cache_update(attn, torch.zeros_like(k), torch.ones_like(v), where_v, slot)
            assert int((where_k != 0).sum()) == k.numel() and int((where_v != 0).sum()) == v.numel()
            diff = (expected.float() - cache.float()).abs()
            out[li] = (diff[where_k != 0].max().item() / k.float().abs().max().item(),
                       diff[where_v != 0].max().item() / v.float().abs().max().item())
        return out
    return llm.apply_model(compare)[0]


def logprob_errors(out, ids, ref):
    """(computed ids, exit layers, largest |logprob - reference|, largest |logit|) for one request."""
    gen = list(out.outputs[0].token_ids)
    seq = ids + gen[:-1]                 # the tokens the engine ran (the last one is never fed back)
    logits, exit_at, _ = ref.run(seq)
    lp = torch.log_softmax(logits, -1)
    got = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    got += [out.outputs[0].logprobs[i][gen[i]].logprob for i in range(len(gen))]
    want = [lp[i - 1, seq[i] if i < len(seq) else gen[-1]].item() for i in range(1, len(seq) + 1)]
    greedy = [int(lp[len(ids) - 1 + i].argmax()) for i in range(len(gen))]
    return seq, exit_at, max(abs(a - b) for a, b in zip(got, want)), logits.abs().max().item(), gen, greedy
