"""Shared fixtures: the default model, a tiny random model, one vLLM engine and one vLLM server.

Engines are session-scoped so that the whole suite starts each real component once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors checkpoint."""
    from budgetlm.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model_path(default_model_path: Path) -> Path:
    """A 2-layer random-weight Llama on the default tokenizer."""
    from budgetlm.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def vllm_backend(default_model_path: Path) -> Iterator[object]:
    """One in-process vLLM engine (vllm-cpu here) on the default model for the whole session."""
    from budgetlm.backends.vllm import VLLMBackend

    backend = VLLMBackend(model=str(default_model_path), seed=0)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def hf_backend(default_model_path: Path) -> Iterator[object]:
    """The default model on HF transformers (fp32 on the CPU)."""
    from budgetlm.backends.hf import HFBackend

    backend = HFBackend(model=str(default_model_path))
    yield backend
    backend.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM OpenAI-compatible server on 127.0.0.1 serving the default model; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(default_model_path), "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "2048", "--gpu-memory-utilization", "0.3",
        "--max-logprobs", "20", "--seed", "0", "--dtype", "float32", "--enable-prompt-tokens-details",
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 420
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server did not answer /health in 420 s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
