"""Evaluation metrics on precomputed embeddings: retrieval, zero-shot, and the report writers.

Pure functions of tensors (no model, no data loading): the ``evaluate`` stage embeds the eval sets
and calls these.
"""

from llm2clip.config.templates import OPENAI_IMAGENET_TEMPLATES, TEMPLATE_PRESETS, resolve_templates
from llm2clip.eval.paper_table import PaperTable, build_paper_table
from llm2clip.eval.report import (
    ReportSection,
    flatten_metrics,
    write_metrics_json,
    write_recall_plots,
    write_report,
)
from llm2clip.eval.retrieval import (
    clip_metrics,
    multi_caption_metrics,
    rank_metrics,
    recall_at_ks,
    recall_curve,
    retrieval_ranks,
    to_open_clip_names,
)
from llm2clip.eval.zeroshot import (
    DEFAULT_TEMPLATES,
    SINGLE_TEMPLATE,
    build_prompts,
    class_embeddings,
    zeroshot_metrics,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "OPENAI_IMAGENET_TEMPLATES",
    "SINGLE_TEMPLATE",
    "TEMPLATE_PRESETS",
    "PaperTable",
    "ReportSection",
    "build_paper_table",
    "build_prompts",
    "class_embeddings",
    "clip_metrics",
    "flatten_metrics",
    "multi_caption_metrics",
    "rank_metrics",
    "recall_at_ks",
    "recall_curve",
    "resolve_templates",
    "retrieval_ranks",
    "to_open_clip_names",
    "write_metrics_json",
    "write_recall_plots",
    "write_report",
    "zeroshot_metrics",
]
