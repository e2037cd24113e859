"""``common``: the settings every stage reads."""

from __future__ import annotations

from dataclasses import dataclass

from llm2clip.config.base import ConfigError


@dataclass(frozen=True)
class CommonConfig:
    """Settings every stage reads.

    Attributes:
        seed: Global seed; every stage derives its own generators from it.
        experiment: MLflow experiment name.
        tracking: Log runs to MLflow. Off: stages run the same and log nothing.
        tracking_uri: MLflow tracking URI. Empty: ``$MLFLOW_TRACKING_URI``, else a local
            ``sqlite:///mlflow.db`` in the working directory.
        s3_endpoint_url: S3 endpoint for ``s3://`` inputs/outputs (MinIO, moto). Empty: the
            AWS default (or ``$AWS_ENDPOINT_URL``). Credentials always come from the
            environment or AWS profile, never from params.
        caption_fields: Named caption types every prepared sample carries, in order. The first
            two are the caption-contrastive pair and the default CRA pair. The pipeline needs at
            least one (checked by ``Params``); an evaluation set without captions (ImageNet)
            runs prepare_data/embed_captions with none.
        registered_model: MLflow registered-model name of the vision model (evaluate compares
            with its ``champion``; register creates versions of it).
        data_revision: The git revision (commit, tag or branch) of the DVC-tracked data this run
            reads: the ``rev`` of every ``dvc`` source that names none, recorded as the
            ``llm2clip.data_revision`` tag of every stage's MLflow run and the ``data_revision``
            tag of the registered model version (``--data-revision`` of ``pipelines.submit`` /
            ``pipelines.local``). Empty: none (every ``dvc`` source then needs its own ``rev``).
    """

    seed: int = 0
    experiment: str = "llm2clip"
    tracking: bool = True
    tracking_uri: str = ""
    s3_endpoint_url: str = ""
    caption_fields: tuple[str, ...] = ("short", "dense")
    registered_model: str = "llm2clip"
    data_revision: str = ""

    def __post_init__(self) -> None:
        if len(set(self.caption_fields)) != len(self.caption_fields):
            raise ConfigError(f"common.caption_fields: duplicate names in {self.caption_fields}")
