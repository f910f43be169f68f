"""The bleu evaluate module lives in bleu.py (load it with hf_captioner.metrics.load)."""
