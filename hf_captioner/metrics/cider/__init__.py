"""The cider evaluate module lives in cider.py (load it with hf_captioner.metrics.load)."""
