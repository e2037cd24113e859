"""Fan-out parts: one stage's work cut across pods, and the checks its merge makes.

prepare_data and embed_captions can run as ``N`` *group tasks* (a KFP ``ParallelFor``, one pod
each; ``shard_groups`` in the cluster profile) followed by a *merge task*:

- group task ``g`` of ``N`` does the slow part of the stage for its share of the work (its
  prepare_data groups, :func:`llm2clip.data.groups.part_groups`; its embed_captions shards,
  :func:`llm2clip.text.embed.assign_work`) into its own output folder and writes ``part.json``
  there last: which part it is, the *plan* it worked from (a digest of everything its share's
  outputs depend on) and what it made;
- the merge task takes every part folder, checks them (:func:`read_parts`: all ``N`` parts,
  each once, made from the plan the merge itself computes) and verifies each piece of work
  again before using it (the same checks a rerun makes before reusing a finished piece); it then
  writes the stage's usual output and manifest. Anything missing or made from other inputs is
  one :class:`~llm2clip.io.StageError` naming the group task to re-run.

The output is the one a single process makes: the shares decide only who does the work, never
what it is. A group task killed half-way leaves its finished pieces verified in its folder, so
its retry redoes only the rest; KFP's cache skips the group tasks that finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llm2clip.io import StageError, atomic_write_text, is_remote, s3_filesystem

PART_FILE = "part.json"
FORMAT = 1


def parse_part(text: str) -> tuple[int, int]:
    """``"g/N"`` (the CLI's ``--part``) -> ``(g, N)``.

    Raises:
        ValueError: not two integers with ``0 <= g < N``.
    """
    try:
        part, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r}: write it as PART/PARTS, e.g. 0/4 (parts count from 0)") from None
    check_part(part, parts)
    return part, parts


def check_part(part: int, parts: int) -> None:
    """Raises ValueError unless ``0 <= part < parts``."""
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: a part is 0..{max(parts, 1) - 1}")


def _location(folder: str | os.PathLike) -> str:
    return f"{str(folder).rstrip('/')}/{PART_FILE}"


def write_part(folder: str | os.PathLike, stage: str, part: int, parts: int, plan: str, body: dict[str, Any],
               endpoint_url: str = "") -> dict[str, Any]:
    """Write ``part.json`` into ``folder`` (last, atomically: its presence says the part is complete)."""
    record = {**body, "stage": stage, "format": FORMAT, "part": part, "parts": parts, "plan": plan}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    target = _location(folder)
    if is_remote(target):
        s3_filesystem(endpoint_url).pipe_file(target, text.encode("utf-8"))
    else:
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(target), text)
    return record


def _read(folder: str, endpoint_url: str) -> dict[str, Any] | None:
    target = _location(folder)
    try:
        data = s3_filesystem(endpoint_url).cat_file(target) if is_remote(target) else Path(target).read_bytes()
        record = json.loads(data)
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_parts(folders: list[str], stage: str, plan: str, endpoint_url: str = "") -> list[tuple[str, dict]]:
    """The part folders of one fan-out, checked and ordered by part number.

    Args:
        folders: The group tasks' output folders, in any order.
        stage: The stage whose parts they must be.
        plan: The plan digest the merge computed; every part must have been made from it.

    Returns:
        ``[(folder, part record)]`` for parts ``0..N-1``.

    Raises:
        StageError: a folder without a complete part (the group task did not finish), a part
            of another stage, a missing or repeated part, or one made from another plan.
    """
    if not folders:
        raise StageError(f"{stage}: the merge got no group parts")
    found: dict[int, tuple[str, dict]] = {}
    for folder in map(str, folders):
        record = _read(folder, endpoint_url)
        if record is None or record.get("format") != FORMAT:
            raise StageError(f"{stage}: {folder} holds no complete group part ({PART_FILE}): its group task did "
                             f"not finish; re-run it")
        part, parts = record.get("part"), record.get("parts")
        if record.get("stage") != stage:
            raise StageError(f"{stage}: {folder} is a part of {record.get('stage')!r}, not of {stage}")
        if parts != len(folders):
            raise StageError(f"{stage}: {folder} is part {part} of {parts}, but the merge got {len(folders)} parts; "
                             f"run every group task of one fan-out")
        if not isinstance(part, int) or not isinstance(parts, int) or not 0 <= part < parts:
            raise StageError(f"{stage}: {folder}: {PART_FILE} names part {part} of {parts}")
        if part in found:
            raise StageError(f"{stage}: part {part} of {parts} given twice ({found[part][0]} and {folder})")
        if record.get("plan") != plan:
            raise StageError(f"{stage}: group part {part} of {parts} ({folder}) was made from other inputs or "
                             f"settings than this merge's; re-run {stage}'s group tasks")
        found[part] = (folder, record)
    return [found[p] for p in sorted(found)]
