"""Tasks per model family (clip/, beit3/) and what they share (metrics)."""
