"""The parts ``kvtier.config`` is built from: the values of keys (``values``), the table of keys
(``keys``) and the layers that set them (``sources``). Import from ``kvtier.config``, the public
entry point; these modules are its implementation.

No torch, no vLLM: these modules only read mappings, strings and one YAML file.
"""
