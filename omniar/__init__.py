"""omniar: multimodal autoregressive generation (video/image tokenizer, MoE AR backbone, BiPC UDA)."""

__version__ = "0.1.0"
