"""The rouge evaluate module lives in rouge.py (load it with hf_captioner.metrics.load)."""
