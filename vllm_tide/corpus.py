"""The fixed data split every vllm-tide tool uses.

- calibration: State of the Union addresses up to 2000, minus the validation slice;
- validation: every 10th of those addresses (by date), held out from router training;
- dev: addresses after 2000 (threshold and setting choices are made here);
- test: Moby Dick (figures are reported here).
"""
from __future__ import annotations

import glob
import json
import os
import re

from .errors import TideConfigError

SPLITS = ("calibration", "validation", "dev", "test")
# a repo checkout's data/ (make setup fetches it); TIDE_DATA_DIR points elsewhere
DEFAULT_DATA_DIR = os.environ.get("TIDE_DATA_DIR") or \
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def _sotu(data_dir: str) -> list[tuple[int, str]]:
    files = sorted(glob.glob(os.path.join(data_dir, "sotu", "*.txt")))
    return [(int(os.path.basename(p)[:4]), p) for p in files]


def split_files(split: str, data_dir: str = DEFAULT_DATA_DIR) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test":
        files = glob.glob(os.path.join(data_dir, "moby-dick", "chapter_*.txt"))
        files.sort(key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0]))
    elif split == "dev":
        files = [p for year, p in _sotu(data_dir) if year > 2000]
    else:
        early = [p for year, p in _sotu(data_dir) if year <= 2000]
        held = {p for i, p in enumerate(early) if i % 10 == 9}
        files = [p for p in early if (p in held) == (split == "validation")]
    if not files:
        raise TideConfigError(f"There is no text for the {split!r} split under {data_dir} (the fixed split's corpora "
                              f"come with a repo checkout's `make setup`); pass your own text with --corpus "
                              f"FILES_OR_FOLDERS, or set TIDE_DATA_DIR to a folder holding sotu/ and moby-dick/.")
    return files


TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
# where a JSON Lines record keeps its document, in order of preference
TEXT_KEYS = ("text", "content", "document", "prompt", "question", "instruction", "input")


def json_line_text(line: str, keys: tuple[str, ...]) -> str | None:
    """The text of one JSON Lines record: a JSON string, or an object's first string field among
    ``keys``; None when it has none."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(row, dict):
        row = next((row[k] for k in keys if isinstance(row.get(k), str)), None)
    return row if isinstance(row, str) and row.strip() else None


def json_lines_texts(lines: list[tuple[int, str]], keys: tuple[str, ...], where: str, instead: str) -> list[str]:
    """The texts of numbered JSON Lines records (json_line_text); a record without one is a one-sentence
    error naming its line in ``where``, with ``instead`` as the alternative."""
    out = []
    for number, line in lines:
        text = json_line_text(line, keys)
        if text is None:
            raise TideConfigError(f"Line {number} of {where} is not a JSON string or an object with a string "
                                  f"under one of {', '.join(keys)}; fix that line or {instead}.")
        out.append(text)
    return out


def check_paths(paths: list[str], flag: str) -> None:
    """Text paths given on the command line exist: else one sentence naming the first missing one."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise TideConfigError(f"{flag} {missing[0]!r} does not exist; pass text files or folders of .txt, .md or "
                              f".jsonl files.")


def read_texts(paths: list[str]) -> list[str]:
    """Documents from files or folders (their .txt, .md and .jsonl files), in a stable order. A .jsonl
    file holds one document per line: a JSON string, or an object with a text field (TEXT_KEYS)."""
    out = []
    for p in paths:
        files = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                       if f.endswith(TEXT_SUFFIXES)) if os.path.isdir(p) else [p]
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                if not f.endswith(".jsonl"):
                    out.append(fh.read())
                    continue
                lines = [(n, line) for n, line in enumerate(fh, start=1) if line.strip()]
                out += json_lines_texts(lines, TEXT_KEYS, repr(f), "pass plain text files")
    return out


def split_texts(split: str, data_dir: str = DEFAULT_DATA_DIR) -> list[str]:
    return read_texts(split_files(split, data_dir))
