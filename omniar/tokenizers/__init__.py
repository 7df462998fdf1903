"""Tokenizers: the causal 3D multi-scale video tokenizer and the byte-level text tokenizer."""

from .codes import MultiScaleCodes
from .video import TokenizerOutput, VideoTokenizer

__all__ = ["MultiScaleCodes", "TokenizerOutput", "VideoTokenizer"]
