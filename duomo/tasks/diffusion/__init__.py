"""Diffusion tasks: generate images from text (classifier-free and CLIP guidance), train a generator through
the one trainer, and measure what was generated (CLIP score, Fréchet distance, colour and shape checks)."""
