"""``evaluate`` and ``register``: metrics, the quality gate, the registry's aliases."""

from __future__ import annotations

from dataclasses import dataclass

from llm2clip.config.base import ConfigError

RETRIEVAL_PROTOCOLS = ("auto", "multi_caption", "one_to_one")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set in the prepared-shard format (run prepare_data + embed_captions on it).

    Attributes:
        name: Prefix of its metrics (``<name>.<caption field>.<metric>``, ``<name>.headline.*``).
        split: Which split of the prepared data to evaluate; empty: ``val`` of the pipeline's own
            data, ``test`` of an ``eval_data`` set (prepared sets have only that split).
        data: A prepare_data output dir; empty = the pipeline's own ``data`` input (or, with
            ``eval_data``, the prepared eval set of that name).
        embeddings: Its embed_captions output dir; empty = the pipeline's own ``embeddings``.
        eval_data: Name of an entry of the ``eval_data`` params section (a public benchmark such
            as COCO or ImageNet, prepared and embedded once by ``prepare_data --eval-set`` and
            ``embed_captions``); empty: the pipeline's own data.
        protocol: Retrieval protocol of the headline metrics (``<name>.headline.*``):
            ``multi_caption`` (an image's hit counts when any of its captions is in the top k;
            every caption is a text query: COCO/Flickr30k as the paper reports them),
            ``one_to_one`` (the image and the first caption of the field: the long-caption sets),
            ``auto`` (multi_caption where some image of the field has more than one caption).
        caption_field: Caption field of the headline metrics; empty = the set's first field.
        column: Column of the paper-layout table: ``flickr30k``, ``coco``, ``sharegpt4v``,
            ``urban1k``, ``docci``, ``imagenet``, ``crosslingual`` (the paper's) or any label of
            your own; empty = the set's name.
        cra: Also report CRA on this set (the paper's caption retrieval accuracy: the first two
            captions of ``caption_field`` of every image retrieve each other), from the stored
            caption embeddings of the tuned caption encoder.
    """

    name: str = "val"
    split: str = ""
    data: str = ""
    embeddings: str = ""
    eval_data: str = ""
    protocol: str = "auto"
    caption_field: str = ""
    column: str = ""
    cra: bool = False

    def __post_init__(self) -> None:
        if bool(self.data) != bool(self.embeddings):
            raise ConfigError(
                f"evaluate.eval_sets[{self.name}]: give both data and embeddings, or neither"
            )
        if self.eval_data and self.data:
            raise ConfigError(f"evaluate.eval_sets[{self.name}]: give eval_data or data/embeddings, not both")
        if self.protocol not in RETRIEVAL_PROTOCOLS:
            raise ConfigError(f"evaluate.eval_sets[{self.name}].protocol: {self.protocol!r} is not one of "
                              f"{list(RETRIEVAL_PROTOCOLS)}")

    @property
    def resolved_split(self) -> str:
        """The split to score: the configured one, else ``test`` of an eval_data set, else ``val``."""
        return self.split or ("test" if self.eval_data else "val")


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate: retrieval and zero-shot metrics, comparison with the champion, a quality gate.

    Attributes:
        eval_sets: The sets to evaluate; the first one carries the primary metric.
        primary_metric: Metric the gate and the registry compare (``mean_R_at_1`` of the first
            set = mean of image->text and text->image R@1 over its caption fields, 1:1 protocol).
        min_primary: Quality gate: the primary metric must reach this to be registered.
        compare_champion: Read the current ``champion`` of ``common.registered_model`` for the
            report's comparison columns (needs tracking on; skipped when there is none).
        baseline_model: Optional exported model dir evaluated the same way, for comparison.
        batch_size: Images per forward pass.
        recall_max_k: Longest k of the recall@k curves.
    """

    eval_sets: tuple[EvalSet, ...] = (EvalSet(),)
    primary_metric: str = "val.mean_R_at_1"
    min_primary: float = 0.0
    compare_champion: bool = True
    baseline_model: str = ""
    batch_size: int = 64
    recall_max_k: int = 10

    def __post_init__(self) -> None:
        if not self.eval_sets:
            raise ConfigError("evaluate.eval_sets: at least one eval set is needed")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"evaluate.eval_sets: names must be unique, got {names}")
        if self.batch_size < 1 or self.recall_max_k < 1:
            raise ConfigError("evaluate.batch_size and evaluate.recall_max_k must be >= 1")


@dataclass(frozen=True)
class RegisterConfig:
    """register: log the model to the MLflow registry and move aliases.

    Attributes:
        promote_margin: ``champion`` moves only when the primary metric beats the current
            champion's by more than this.
        require_gate: Refuse to register when evaluate's quality gate failed.
        caption_encoder_name: Registered name of the caption encoder; empty =
            ``<common.registered_model>-caption-encoder``.
    """

    promote_margin: float = 0.0
    require_gate: bool = True
    caption_encoder_name: str = ""
