"""Calibrate TIDE routers for a Hugging Face causal LM.

    python calibration/calibrate.py --model models/smollm2-135m-instruct --output outputs/router.safetensors

The logic lives in vllm_tide.calibrate (importable: ``from vllm_tide.calibrate import calibrate``).
"""
import sys

from vllm_tide.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
