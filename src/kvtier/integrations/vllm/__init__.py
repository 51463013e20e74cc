"""kvtier's vLLM v1 KV connector.

Use with ``--kv-transfer-config '{"kv_connector":"KVTierConnector","kv_role":"kv_both",
"kv_connector_extra_config":{"config":"kvtier.yaml"}}'`` (kvtier registers the name through vLLM's
plugin entry point; ``"kv_connector_module_path":"kvtier.integrations.vllm"`` works too).
"""

from kvtier.integrations.vllm.connector import KVTierConnector

__all__ = ["KVTierConnector"]
