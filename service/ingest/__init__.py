"""Prometheus-native doors (issue 26): remote-write and OTLP in, scores back as series,
PromQL watches. README "Point Prometheus at tsad"; service/README.md has the rules.

- ``wire``: remote-write 1.0 (snappy protobuf, ``prompb/`` vendored) and OTLP decoding
- ``mapping``: series to streams (default ids, grouping rules)
- ``engine``: checks samples, routes them, stages grouped rows, scores streams
- ``transaction``: the one door to the scoring transaction of POST /score
- ``writeback``: scores remote-written to TSAD_WRITEBACK_URL
- ``promapi``, ``watch``: the Prometheus query API and watch mode
- ``state``: what the doors keep in the store (stages, watches, cursors, leases)
- ``router``, ``runtime``, ``config``: HTTP routes, start and stop, TSAD_INGEST_CONFIG
- ``local``: a Prometheus server and an exporter as processes, for tests and benchmarks
"""
