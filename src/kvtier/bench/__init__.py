"""Measuring tools shared by ``kvtier demo`` and ``kvtier bench``: start and stop an engine server
(``server``), send requests and time them (``client``), build multi-user chat workloads
(``workload``), summarise timings (``summary``) and read Prometheus text (``scrape``).

Nothing here imports torch or vLLM: the engine runs in its own process and is spoken to over HTTP.
"""
