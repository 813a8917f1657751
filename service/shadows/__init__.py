"""Shadow detectors: any detector run beside a stream's live one on the same points,
compared on the operator's own labels, promoted with one call; never paging anyone.

| module | owns |
| --- | --- |
| `config.py` | a shadow's binding and identity, and where its sections live (`shadow.<name>.`) |
| `engine.py` | one shadow: its own `StreamScorer`, its mark and counters, alerts, comparison log |
| `log.py` | per-point records: live results waiting for the shadows, the comparison log |
| `stream.py` | a stream's shadows inside its scorer: cheap ones catch up at chunk ends |
| `queue.py` | costly shadows (language model, torch) on a bounded background queue |
| `handover.py` | promotion: the shadow becomes live, the live detector a shadow |
| `report.py` | the comparison: agreement, rank correlation, cost, labels, NAB-style |
| `service.py`, `schemas.py` | `/streams/{id}/shadows`: PUT/GET/DELETE, report, scores, promote |
"""
