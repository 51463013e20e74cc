"""What changes the KV besides the tokens is bound into the keys: the model's files and settings,
LoRA adapters, multimodal inputs; prompt embeddings are refused."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from kvtier.fingerprint import SAMPLE_BYTES, SAMPLES_PER_FILE, folder_fingerprint, model_fingerprint
from kvtier.integrations.vllm.requests import content_binding, request_controls


def checkpoint(path: Path, weights: bytes, config: str = '{"hidden_size": 64}') -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config)
    (path / "model.safetensors").write_bytes(weights)
    return str(path)


def test_a_checkpoint_swapped_in_at_the_same_path_gets_another_fingerprint(tmp_path: Path) -> None:
    big = os.urandom(SAMPLES_PER_FILE * SAMPLE_BYTES * 4)
    model = checkpoint(tmp_path / "m", big)
    before = model_fingerprint(model, None, "bfloat16", "auto", None)
    assert model_fingerprint(model, None, "bfloat16", "auto", None) == before  # stable
    tuned = bytearray(big)
    for offset in range(0, len(tuned), 4096):  # a fine-tune of the same shape: every weight moves
        tuned[offset] ^= 1
    checkpoint(tmp_path / "m", bytes(tuned))
    assert model_fingerprint(model, None, "bfloat16", "auto", None) != before
    checkpoint(tmp_path / "m", big, config='{"hidden_size": 64, "rope_theta": 1e6}')
    assert model_fingerprint(model, None, "bfloat16", "auto", None) != before
    checkpoint(tmp_path / "m", big)
    assert model_fingerprint(model, None, "bfloat16", "auto", None) == before
    for other in (("rev2", "bfloat16", "auto", None), (None, "float16", "auto", None),
                  (None, "bfloat16", "fp8", None), (None, "bfloat16", "auto", "awq")):
        assert model_fingerprint(model, *other) != before


def test_a_hub_name_is_fingerprinted_by_name_and_revision_only(tmp_path: Path) -> None:
    assert folder_fingerprint(str(tmp_path / "not-here")) == ""
    assert model_fingerprint("org/model", "abc", "bfloat16", "auto", None) != \
        model_fingerprint("org/model", "def", "bfloat16", "auto", None)


def test_lora_adapters_and_images_change_the_salt_and_embeddings_are_refused(tmp_path: Path) -> None:
    sql = SimpleNamespace(lora_int_id=1, lora_name="sql", lora_path=checkpoint(tmp_path / "sql", b"s" * 100))
    chat = SimpleNamespace(lora_int_id=2, lora_name="chat", lora_path=checkpoint(tmp_path / "chat", b"c" * 100))
    image = lambda digest, offset: SimpleNamespace(identifier=digest, mm_position=SimpleNamespace(offset=offset,  # noqa: E731
                                                                                              length=16))
    salts = {
        "plain": content_binding(None, [], None),
        "sql": content_binding(sql, [], None),
        "chat": content_binding(chat, [], None),
        "image a": content_binding(None, [image("aaa", 5)], None),
        "image b": content_binding(None, [image("bbb", 5)], None),
        "image a later": content_binding(None, [image("aaa", 9)], None),
    }
    assert salts["plain"] == ""
    assert len(set(salts.values())) == len(salts)  # every one keys differently
    assert content_binding(None, [image("aaa", 5)], None) == salts["image a"]  # and the same again
    assert content_binding(None, [], prompt_embeds=object()) is None
    controls = request_controls(None, "s", "default", binding=salts["sql"])
    assert controls.load and controls.store and controls.salt.startswith("s\x1f") and "lora-files:" in controls.salt
    refused = request_controls(None, None, "default", binding=None)
    assert not refused.load and not refused.store


def test_the_same_adapter_files_key_alike_under_any_name_id_or_path(tmp_path: Path) -> None:
    """Instances name and number adapters as they like and mount them where they like: the files
    decide. An adapter that is not a local folder is keyed by name, id and path."""
    here = SimpleNamespace(lora_int_id=1, lora_name="sql", lora_path=checkpoint(tmp_path / "a", b"s" * 100))
    there = SimpleNamespace(lora_int_id=7, lora_name="sql-v1", lora_path=checkpoint(tmp_path / "b", b"s" * 100))
    other = SimpleNamespace(lora_int_id=1, lora_name="sql", lora_path=checkpoint(tmp_path / "c", b"t" * 100))
    assert content_binding(here, [], None) == content_binding(there, [], None)
    assert content_binding(here, [], None) != content_binding(other, [], None)
    remote = SimpleNamespace(lora_int_id=3, lora_name="hub", lora_path="org/adapter")
    assert content_binding(remote, [], None) == "lora:hub:3:org/adapter"
