"""Fixtures for the Kubeflow-side tests (helpers live in kfp_helpers.py)."""

import pytest
import yaml
from kfp_helpers import load_dvc_stages


@pytest.fixture(scope="session")
def compiled_ir(tmp_path_factory) -> dict:
    """The pipeline compiled by ``pipelines.compile`` and read back as YAML."""
    from pipelines.compile import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("ir") / "llm2clip_pipeline.yaml")
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def dvc_stages() -> dict:
    return load_dvc_stages()
