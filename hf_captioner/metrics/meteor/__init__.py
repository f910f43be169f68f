"""The meteor evaluate module lives in meteor.py (load it with hf_captioner.metrics.load)."""
