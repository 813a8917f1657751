"""Prometheus-native doors (issue 26): remote-write and OTLP in, scores back as series,
PromQL watches. README "Point Prometheus at tsad"; service/README.md has the rules.

- ``router``: the HTTP routes, thin (``DoorsDep``, ``WatchesDep`` of ``service/deps.py``)
- ``doors``: a remote-write or OTLP request, from bytes and headers to scored streams
- ``wire``: remote-write 1.0 (snappy protobuf, ``prompb/`` vendored) and OTLP decoding
- ``mapping``: series to streams (default ids, grouping rules)
- ``engine``: checks samples, routes them, holds grouped rows, scores streams
- ``feed``: into ``ScoreTransaction`` (the /score transaction), in batches, refusals counted
- ``writeback``: scores remote-written to TSAD_WRITEBACK_URL
- ``promapi``, ``watch``, ``admin``: the Prometheus query API, the watch runner, /watches
- ``runtime``, ``config``: the parts built with the service's others, TSAD_INGEST_CONFIG
- ``local``: a Prometheus server and an exporter as processes, for tests and benchmarks

What the doors keep between requests is the storage interface's ``Backend.ingest``
(``service/stores/{memory,redis}/ingest.py``).
"""
