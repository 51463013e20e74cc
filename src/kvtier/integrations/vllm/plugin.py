"""vLLM general plugin (entry point group ``vllm.general_plugins``): registers ``KVTierConnector``
with vLLM's connector factory, so ``--kv-transfer-config '{"kv_connector":"KVTierConnector", ...}'``
works without ``kv_connector_module_path``. vLLM calls it once in every process it starts; it
imports nothing heavy (the factory imports the connector lazily, when one is built). It also routes
kvtier's log lines into vLLM's logging (``logs.py``)."""

from __future__ import annotations

CONNECTOR_NAME = "KVTierConnector"
CONNECTOR_MODULE = "kvtier.integrations.vllm.connector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kvtier.integrations.vllm.logs import adopt_vllm_logging

    adopt_vllm_logging()

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:  # registered already (vLLM may load plugins more than once per process)
        pass
