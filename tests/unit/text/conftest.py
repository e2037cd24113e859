"""Fixtures of the text tests: a tiny random Llama (+ tokenizer) and tiny prepared shards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_assets import make_llama, write_shards  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved 2-layer LlamaForCausalLM (hidden 32) with a word-level tokenizer."""
    return make_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A prepare_data-style dir: 48 train + 16 val images, short + dense captions."""
    return write_shards(tmp_path_factory.mktemp("tiny_shards"))
