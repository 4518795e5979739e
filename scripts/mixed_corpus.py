"""Build the mixed calibration corpus of docs/MEASUREMENTS.md ("Calibrating on more varied text").

Half technical Markdown, half prose: the package descriptions (METADATA: READMEs with code blocks,
tables and links) of the 60 largest ones installed in this venv, less the four the unseen-text
measurement tests on (torch, openai, tqdm, numpy), and every 6th State of the Union address of the
calibration split.

    .venv/bin/python scripts/mixed_corpus.py /tmp/mixcorpus
    .venv/bin/python calibration/calibrate.py --model models/smollm2-135m-instruct \
        --output outputs/mixed-router.safetensors --corpus /tmp/mixcorpus
"""
import glob
import os
import shutil
import sys
import sysconfig

from vllm_tide.corpus import split_files

HELD_OUT = ("torch-", "openai-", "tqdm-", "numpy-", "vllm_tide-")


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    site = sysconfig.get_paths()["purelib"]
    meta = [p for p in glob.glob(os.path.join(site, "*.dist-info", "METADATA"))
            if not os.path.basename(os.path.dirname(p)).startswith(HELD_OUT)]
    meta.sort(key=lambda p: (-os.path.getsize(p), p))
    for p in meta[:60]:
        shutil.copy(p, os.path.join(out, os.path.basename(os.path.dirname(p)) + ".txt"))
    for p in split_files("calibration")[::6]:
        shutil.copy(p, os.path.join(out, "sotu_" + os.path.basename(p)))
    print(f"{len(os.listdir(out))} files in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/mixed-corpus")
