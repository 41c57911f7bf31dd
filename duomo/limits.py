"""How much work one input may cause: the bounds every layer (loading, preprocessing, the server, new model
families) checks before doing the work, in one place. See docs/serve.md for what a request can cost."""

from __future__ import annotations

# Preprocessing scales an image's shortest side to the model's input size and center-crops. An image more
# than this many times as long as wide is refused: its resized copy would be that many crops' worth of
# pixels (the worst case is MAX_ASPECT_RATIO * size**2 pixels, 5 MB at 224 px), never gigabytes.
MAX_ASPECT_RATIO = 32

# Checkpoints: a tensor may not claim more elements than its storage holds (a stride-0 view expanded by
# .contiguous()); a zip entry may not decompress to more than this many times its stored size (torch writes
# entries uncompressed; a compressed one is unusual, a very compressible one is a bomb).
MAX_ZIP_RATIO = 20
# A config may not build a model whose weights would be more than this many times the checkpoint's size
# (plus MAX_CONFIG_SLACK_BYTES, for configs read without weights): sizes are checked before allocation.
MAX_CONFIG_TO_WEIGHTS = 4
MAX_CONFIG_SLACK_BYTES = 64 << 20

# Request bodies: JSON nesting deeper than this is refused before parsing.
MAX_JSON_DEPTH = 64

# Image generation: images one call may make, sampler steps, prompt length (characters; the tokenizer then
# truncates to the text tower's context). The server sets its own, lower bounds (docs/generate.md).
MAX_GENERATE_IMAGES = 1024
MAX_GENERATE_STEPS = 1000
MAX_PROMPT_CHARS = 2000
