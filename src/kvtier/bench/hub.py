"""The model of a bench run: a local folder, or a Hugging Face model id. For an id, the servers get
the id (vLLM downloads the weights itself) and the bench reads ``config.json`` and
``tokenizer.json`` from a snapshot of those few files in the Hugging Face cache."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from kvtier.errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    engine_model: str  # vLLM's --model (and the model name requests carry): a folder or a hub id
    files_dir: str  # a local folder with config.json and tokenizer.json


def resolve_model(model: str, cache_dir: str | None = None, offline: bool = False) -> ModelSource:
    """Where ``model`` (``--model``) comes from. ``ConfigError("--model", ...)`` when it is neither
    a folder nor a hub id, or the hub does not give the files (``offline``: only the cache is read)."""
    if os.path.isdir(model):
        path = os.path.abspath(model)
        return ModelSource(path, path)
    if not HUB_ID.fullmatch(model):
        raise ConfigError("--model", f"{model!r} is neither a model folder nor a Hugging Face model id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(model, allow_patterns=list(MODEL_FILES), cache_dir=cache_dir,
                                   local_files_only=offline)
    except OSError as exc:  # huggingface_hub's errors are OSErrors: not found, offline, no access
        raise ConfigError("--model", f"cannot get config.json and tokenizer.json of {model} from the Hugging Face "
                                     f"Hub: {type(exc).__name__}: {exc}") from None
    if not os.path.exists(os.path.join(str(folder), "config.json")):
        raise ConfigError("--model", f"{model} on the Hugging Face Hub has no config.json")
    return ModelSource(model, str(folder))
