"""BEiT-3 tasks: data tables, training runs, VQA, captioning (decoding, guidance), retrieval, classify."""
