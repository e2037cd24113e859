"""Fixtures for the Kubeflow-side tests (helpers live in kfp_helpers.py)."""

import pytest
import yaml
from kfp_helpers import load_dvc_stages


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """``{profile: (pipeline spec, platform spec)}``: the pipeline compiled by ``pipelines.compile``
    with each shipped cluster profile, read back from its two YAML documents."""
    from pipelines.compile import compile_pipeline

    out = {}
    for profile in ("cpu", "gpu"):
        path = compile_pipeline(tmp_path_factory.mktemp("ir") / f"{profile}.yaml", profile)
        spec, platform = yaml.safe_load_all(path.read_text())
        out[profile] = (spec, platform)
    return out


@pytest.fixture(scope="session")
def compiled_ir(compiled) -> dict:
    """The pipeline spec compiled with the default (cpu) cluster profile."""
    return compiled["cpu"][0]


@pytest.fixture(scope="session")
def dvc_stages() -> dict:
    return load_dvc_stages()
