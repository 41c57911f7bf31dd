"""CLIP tasks: zero-shot, evaluation, probes, fine-tuning, embedding files, parity references."""
