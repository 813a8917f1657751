"""Loaded by schemathesis in tests/test_fuzz.py (SCHEMATHESIS_HOOKS): remote-write and
OTLP bodies are binary protobuf (application/x-protobuf), sent as the raw bytes the fuzzer
generates, like application/octet-stream."""

import schemathesis

schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")
