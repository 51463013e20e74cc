"""``kvtier bench --model``: a folder, or a Hugging Face model id whose config and tokenizer come
from the Hugging Face cache (here a cache laid out as huggingface_hub writes it, read offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.bench.hub import resolve_model
from kvtier.bench.specs import read_model_info
from kvtier.errors import ConfigError

REVISION = "0123456789abcdef0123456789abcdef01234567"
CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
          "vocab_size": 1000}


def hub_cache(root: Path, model_id: str) -> Path:
    """A Hugging Face cache holding ``model_id``'s config.json and tokenizer.json at ``REVISION``."""
    repo = root / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(CONFIG))
    (snapshot / "tokenizer.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def test_a_folder_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    source = resolve_model(str(tmp_path))
    assert source.engine_model == source.files_dir == str(tmp_path)
    assert read_model_info(source.files_dir).served_name == str(tmp_path)


def test_a_hub_id_reads_its_files_from_the_cache_and_gives_the_servers_the_id(tmp_path: Path) -> None:
    snapshot = hub_cache(tmp_path, "acme/tiny-chat")
    source = resolve_model("acme/tiny-chat", cache_dir=str(tmp_path), offline=True)
    assert source.engine_model == "acme/tiny-chat"
    assert Path(source.files_dir) == snapshot
    model = read_model_info(source.files_dir, source.engine_model)
    assert model.served_name == "acme/tiny-chat"
    assert model.kv_bytes_per_token == 2 * 2 * 16 * 2 * 2  # layers x KV heads x head dim x (K, V) x bf16


@pytest.mark.parametrize("name", ["not a model", "./missing-folder", "a/b/c"])
def test_neither_a_folder_nor_an_id(name: str) -> None:
    with pytest.raises(ConfigError, match="--model: .* neither a model folder nor a Hugging Face model id"):
        resolve_model(name)


def test_an_id_the_hub_does_not_give_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--model: cannot get config.json and tokenizer.json of acme/absent"):
        resolve_model("acme/absent", cache_dir=str(tmp_path), offline=True)
