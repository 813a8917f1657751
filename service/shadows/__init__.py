"""Shadow detectors: any detector run beside a stream's live one on the same points,
compared on the operator's own labels, promoted with one call; never paging anyone.

| module | owns |
| --- | --- |
| `config.py` | a shadow's binding and identity, and where its sections live (`shadow.<name>.`) |
| `engine.py` | one shadow: its own `StreamScorer`, its mark and counters, alerts, comparison log |
| `log.py` | per-point records: the live results shadows compare with, the comparison log |
| `stream.py` | a stream's shadows in its scorer: the live results it keeps, batches offered |
| `queue.py` | the bounded background queue: shadows catch up at chunk ends, off /score |
| `worker.py` | the child process each queue task scores in (off the service's GIL, at nice 10) |
| `handover.py` | promotion: the shadow becomes live, the live detector a shadow |
| `report.py` | the comparison: agreement, rank correlation, cost, labels, NAB-style |
| `service.py`, `schemas.py` | `/streams/{id}/shadows`: PUT/GET/DELETE, report, scores, promote |
"""
