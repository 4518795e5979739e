"""The model's own answers, as validation text for the operating-point choice.

Decode steps process what the model itself writes, and that exits very differently from prose: on the
default model's chat answers about 5x more tokens exit than on State of the Union text, and a quality
bar met on prose need not hold there. So calibration also asks the frozen model to answer instructions
about passages of its validation text (through its chat template; a model without one continues the
passage) and judges each point on those greedy answers too.
"""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

# Varied tasks over one passage each: summaries, explanations, rewriting, questions, continuation.
INSTRUCTIONS = (
    "Summarize the following passage in two or three sentences.",
    "What is the main point of this passage? Explain it briefly.",
    "Rewrite this passage in plain, simple English.",
    "List three questions a reader might ask after reading this passage.",
    "Continue this text with one more paragraph in the same style.",
    "Explain this passage to a high-school student.",
    "Give this passage a title and say in one sentence why you chose it.",
    "Which words in this passage might be hard for a reader? Explain two of them.",
)
PASSAGE_TOKENS = 96
MAX_NEW_TOKENS = 128


def passage(tokenizer, chunk: list[int]) -> str:
    """Readable text from a token chunk: whole sentences when there are some, else whole words."""
    text = tokenizer.decode(chunk[:PASSAGE_TOKENS], skip_special_tokens=True)
    start, end = text.find(". ") + 2, text.rfind(".") + 1
    if start > 1 and end - start > len(text) // 2:
        return text[start:end].strip()
    words = text.split()
    return " ".join(words[1:-1] if len(words) > 2 else words)


def prompts(tokenizer, chunks: list[list[int]], n: int, own: list[str] | None = None) -> list[list[int]]:
    """n prompts over evenly spaced chunks, cycling through the instructions; or the user's own prompts
    (e.g. from their request log), as they are."""
    if own:
        return [_chat(tokenizer, text) or tokenizer(text, add_special_tokens=True)["input_ids"] for text in own[:n]]
    picked = [chunks[i * len(chunks) // n] for i in range(n)] if n <= len(chunks) else \
        [chunks[i % len(chunks)] for i in range(n)]
    out = []
    for i, chunk in enumerate(picked):
        text = passage(tokenizer, chunk)
        out.append(_chat(tokenizer, f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]}\n\n{text}")
                   or tokenizer(text, add_special_tokens=True)["input_ids"])
    return out


def _chat(tokenizer, content: str) -> list[int] | None:
    """A one-turn chat prompt, or None for a model without a usable chat template (it continues the text)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    except Exception:   # templates that insist on other roles or fields: fall back to plain text
        return None


BATCH = 16     # prompts generated together: a CPU decode step costs about the same for 1 or 16 rows


@torch.no_grad()
def generate(model, tokenizer, chunks: list[list[int]], tokens: int, max_new_tokens: int = MAX_NEW_TOKENS,
             own: list[str] | None = None, batch: int = BATCH) -> list[tuple[list[int], int]]:
    """(prompt + greedy answer, prompt length) pairs until the answers hold ``tokens`` tokens (the last
    one cut to fit). An answer ends at the model's end-of-sequence token (kept: predicting it is part of
    answering). Prompts are generated ``batch`` at a time, left-padded, with the KV cache."""
    if tokens <= 0 or not (chunks or own):
        return []
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # a generous prompt list: answers that end early leave room for more
    todo = prompts(tokenizer, chunks, max(1, 2 * tokens // max_new_tokens + 2), own)
    out, total = [], 0
    with tqdm(total=tokens, desc="model's own answers", unit="tok", file=sys.stderr) as bar:
        for b in range(0, len(todo), batch):
            if total >= tokens:
                break
            group = todo[b:b + batch]
            width = max(map(len, group))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
            new = model.generate(ids, attention_mask=mask, max_new_tokens=min(max_new_tokens, tokens - total),
                                 do_sample=False, pad_token_id=pad)[:, width:].tolist()
            for p, answer in zip(group, new):
                ends = [i for i, t in enumerate(answer) if t in eos]
                answer = answer[:ends[0] + 1] if ends else answer
                answer = answer[:tokens - total]
                if answer:
                    out.append((p + answer, len(p)))
                    total += len(answer)
                    bar.update(len(answer))
    return out


PROMPT_KEYS = ("prompt", "question", "instruction", "input", "text")


def read_prompts(path: str, flag: str = "--answer-prompts") -> list[str]:
    """One prompt per line (blank lines skipped); literal \\n inside a line is a newline. A .jsonl file
    holds one JSON string or object per line, the prompt under one of PROMPT_KEYS (a dataset or request
    log as it is). ``flag`` names the option the file came from, for the error."""
    from .errors import TideConfigError
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, start=1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise TideConfigError(f"Cannot read {flag} {path!r} ({e.__class__.__name__}); pass a UTF-8 "
                              f"text file with one prompt per line.") from None
    if not lines:
        raise TideConfigError(f"{flag} {path!r} holds no prompts; put one prompt per line.")
    if not path.endswith(".jsonl"):
        return [line.replace("\\n", "\n") for _, line in lines]
    from .corpus import json_lines_texts
    return json_lines_texts(lines, PROMPT_KEYS, f"{flag} {path!r}", "pass plain text, one prompt per line")
