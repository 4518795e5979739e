"""Convert a GGUF checkpoint into a plain Hugging Face folder that vLLM and transformers load directly.

usage: convert_gguf.py GGUF_DIR GGUF_FILE OUT_DIR

transformers dequantizes the GGUF weights to float on load; the quantization config it attaches
must be dropped before saving, or the saved folder claims a quantization it no longer has.
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    src, name, out = sys.argv[1:4]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
