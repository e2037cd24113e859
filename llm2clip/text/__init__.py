"""The LLM text side: caption encoder (bidirectional attention, pooling, prompt template),
model loading (package resources, GGUF, local dirs), caption-contrastive training (LoRA +
DeepSpeed, optional MNTP) and CRA.

Public API::

    from llm2clip.text import CaptionEncoder, EncoderSettings, caption_retrieval_accuracy
    enc = CaptionEncoder.from_pretrained("path/to/caption_encoder")   # settings come with it
    vectors = enc.encode(["a red circle"], batch_size=64)              # (N, D) float32, L2-normed
"""

from llm2clip.text.cra import CRA_PROTOCOL, caption_retrieval_accuracy, cra_from_embeddings
from llm2clip.text.data import ImageCaptions, read_captions, read_splits
from llm2clip.text.encoder import SETTINGS_FILE, CaptionEncoder, EncoderSettings
from llm2clip.text.loading import resolve_model

__all__ = [
    "CRA_PROTOCOL", "SETTINGS_FILE", "CaptionEncoder", "EncoderSettings", "ImageCaptions",
    "caption_retrieval_accuracy", "cra_from_embeddings", "read_captions", "read_splits",
    "resolve_model",
]
