"""``kvtier proxy``: one OpenAI-compatible endpoint in front of vLLM instances with kvtier.

``app`` relays requests (FastAPI + pooled httpx clients; disaggregated prefill's handoff), ``bodies``
builds what each instance gets, ``routing`` picks the instance. Nothing here imports vLLM or the
kvtier engine code.
"""

from kvtier.proxy.app import Proxy, ProxyError, ProxySettings
from kvtier.proxy.bodies import Upstream, decode_body, prefill_body, strip_handoff
from kvtier.proxy.server import ProxyServer, serve

__all__ = ["Proxy", "ProxyError", "ProxyServer", "ProxySettings", "Upstream", "decode_body", "prefill_body",
           "serve", "strip_handoff"]
