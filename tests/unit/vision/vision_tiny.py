"""Sizes of the tiny test checkpoints (imported by the vision tests and their conftest)."""

TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
             "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
# A non-default preprocessor config, to check the tower reads it.
CUSTOM_MEAN = [0.4, 0.45, 0.5]
CUSTOM_STD = [0.2, 0.25, 0.3]
