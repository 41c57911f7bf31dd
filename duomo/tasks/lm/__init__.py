"""The causal-LM family's tasks: decoding (greedy, sampling, streaming), chat, multimodal conversations."""
