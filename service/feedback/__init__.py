"""Operator feedback: labelled ranges (``labels.py``) and the service that stores them and
adapts a SPEAR stream's soft prompts on them (``service.py``)."""
