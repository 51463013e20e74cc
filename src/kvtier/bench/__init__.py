"""Measuring tools of ``kvtier demo`` and ``kvtier bench``.

Shared: start and stop an engine server (``server``), send streamed requests and time them
(``client``), summarise timings (``summary``), read Prometheus text (``scrape``), the demo's chat
over generated gazetteers (``workload``).

``kvtier bench`` (docs/benchmarking.md), top to bottom: ``main`` (the command), ``options``
(its flags), ``runner`` (servers, warm-up, repeats, counters), ``dispatch`` (arrivals,
dependencies, concurrency), ``configs`` (configurations and engine settings), ``scenarios`` and
``trace`` (workloads), ``specs`` (requests, arrivals, model facts), ``stats`` (medians, spreads,
verdicts), ``cost`` (cost view), ``report`` and ``plots`` (outputs), ``cputime`` (engine CPU seconds).

Nothing here imports torch or vLLM: the engine runs in its own process and is spoken to over HTTP.
"""
