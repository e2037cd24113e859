"""llm2clip: train CLIP vision encoders taught by a large language model (arXiv 2411.04997).

The library never imports kfp or dvc; stages live in :mod:`llm2clip.stages`.
"""

__version__ = "0.1.0"
