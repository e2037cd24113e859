"""KFP components: one interface file per stage (``components/<stage>/component.py``).

A component holds no logic. Its body validates the two params sections it is given and calls
``llm2clip.stages.<stage>.run`` with paths from KFP artifacts, so a pipeline task runs the same
code as ``dvc repro``. Every component runs in the one project image below; its tag follows the
package version, so bump ``llm2clip.__version__`` for every pushed build (KFP caches by image).
"""

from __future__ import annotations

import importlib
from typing import Any

from llm2clip import __version__

IMAGE = f"ghcr.io/llm2clip/llm2clip:{__version__}"
"""The project image every component runs in (built from the repo's Dockerfile)."""


def component(stage: str) -> Any:
    """The KFP component of ``stage``: ``components.<stage>.component.<stage>``."""
    return getattr(importlib.import_module(f"components.{stage}.component"), stage)
