"""The bundled load-testing harness behind ``trioproxy bench``.

It starts the mock Codex backend and a proxy on loopback (or attaches to a running proxy with
``--target``), runs scenarios against the proxy and, as the baseline, against the mock
directly in the same run, samples the proxy process, and writes ``results.json``,
``summary.md`` and PNG plots. See ``docs/load-testing.md``.

Modules: ``config`` (options and scenario defaults), ``stack`` (processes and endpoints),
``clients`` (the SSE and WebSocket load clients), ``bodies`` (Codex-shaped requests),
``measure`` (HDR histograms and counters), ``sampler`` (psutil), ``phase`` (one scenario
against one endpoint, gauges, progress), ``workers`` (the clients' loops), ``runs`` (what the
scenarios share), ``scenarios`` (and ``stress``, ``idle``), ``report``, ``plots``, ``runner``.
"""
