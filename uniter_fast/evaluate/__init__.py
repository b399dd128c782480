"""Evaluation of fine-tuned models: `python -m uniter_fast.evaluate` (see __main__.py)."""
