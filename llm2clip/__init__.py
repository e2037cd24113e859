"""llm2clip: train CLIP vision encoders taught by a large language model (arXiv 2411.04997).

The library never imports kfp or dvc; stages live in :mod:`llm2clip.stages`.
``from llm2clip import LLM2CLIPModel`` works, but torch is only imported when it is asked for.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `import llm2clip` (CLI start-up, KFP component imports) stays free of torch.
    if name == "LLM2CLIPModel":
        from llm2clip.vision.model import LLM2CLIPModel

        return LLM2CLIPModel
    raise AttributeError(f"module 'llm2clip' has no attribute {name!r}")
