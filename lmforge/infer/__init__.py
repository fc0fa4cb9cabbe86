"""Inference: sampling, generation, quantization, speculative decoding."""
