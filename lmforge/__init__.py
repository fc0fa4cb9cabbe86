"""lmforge: from raw text to a fast, served Transformer language model on one ordinary computer."""

__version__ = "0.1.0"
