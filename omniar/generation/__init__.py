"""Generation: sampling with classifier-free guidance and the text-to-video pipeline."""

from .pipeline import TextToVideoOutput, TextToVideoPipeline
from .sampling import filter_logits, guided_logits, sample

__all__ = ["TextToVideoOutput", "TextToVideoPipeline", "filter_logits", "guided_logits", "sample"]
