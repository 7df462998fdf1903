"""Tokenizers: the causal 3D multi-scale video tokenizer and the byte-level text tokenizer."""

from .codes import MultiScaleCodes, scale_names, scale_shapes, tokens_per_frame
from .text import TextTokenizer
from .video import TokenizerOutput, VideoTokenizer

__all__ = ["MultiScaleCodes", "TextTokenizer", "TokenizerOutput", "VideoTokenizer", "scale_names", "scale_shapes",
           "tokens_per_frame"]
