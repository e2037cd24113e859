"""The program behind ``llm2clip import <kind> SRC DST``.

:mod:`llm2clip.cli` runs this module with :func:`runpy.run_module` and calls :func:`run`:
importing it would put the importers (and through them the vision and text packages) into every
pipeline stage's code closure (``tests/code_deps.py``, the ``dvc.yaml`` deps), although no stage
ever runs them. Errors propagate to the CLI, which prints a :class:`~llm2clip.io.StageError` as
one line.
"""

from __future__ import annotations

import logging

from llm2clip.importers import KINDS, ImportResult, import_checkpoint

log = logging.getLogger(__name__)

KIND_NAMES = tuple(KINDS)


def run(kind: str, src: str, dst: str, *, caption_encoder: str | None = None, link: str | None = None,
        overwrite: bool = False) -> ImportResult:
    """Import ``src`` (a local snapshot of a released repo) as ``kind`` into ``dst``.

    ``caption_encoder`` (vision kinds) and ``link`` (``caption-encoder``) are passed on when given;
    one that the kind does not take is a StageError.
    """
    return import_checkpoint(kind, src, dst, caption_encoder=caption_encoder, link=link,
                             overwrite=overwrite or None)
