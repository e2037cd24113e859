"""prepare_data fanned out across pods: group tasks (run_part) + a merge give the single-process
output byte for byte; the merge refuses parts it cannot trust and names the group task to re-run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_prepare_workers import COMMON, GOLDEN_MIXED, OUTPUT, output_sums

from llm2clip.data import groups, parts
from llm2clip.io import StageError
from llm2clip.stages import prepare_data

pytest_plugins = ["test_prepare_workers"]  # the ``mixed`` fixture: 8 groups of 4 source kinds


def run_parts(cfg, root, n: int) -> list[str]:
    folders = [str(root / f"part{g}") for g in range(n)]
    for g, folder in enumerate(folders):
        result = prepare_data.run_part(cfg, COMMON, part=g, parts=n, data_part=folder)
        assert (result.part, result.parts, result.groups) == (g, n, len(range(g, 8, n)))
    return folders


@pytest.mark.parametrize(("n", "workers"), [(1, 1), (3, 2)])
def test_group_parts_and_a_merge_write_the_single_process_output(mixed, tmp_path, n, workers):
    cfg = replace(mixed, workers=workers)
    folders = run_parts(cfg, tmp_path, n)
    for g in range(n):  # each part holds exactly its round-robin share of the groups
        made = sorted(p.name for p in (tmp_path / f"part{g}" / groups.GROUPS_DIR).iterdir())
        assert made == sorted(f"group-{k:06d}.{ext}" for k in range(g, 8, n) for ext in ("json", "tar"))
        record = json.loads((tmp_path / f"part{g}" / parts.PART_FILE).read_text())
        assert record["groups"] == [f"group-{k:06d}" for k in range(g, 8, n)]
    prepare_data.run(cfg, COMMON, data=str(tmp_path / "out"), parts=list(reversed(folders)))  # any order
    assert output_sums(tmp_path / "out") == GOLDEN_MIXED
    assert all(OUTPUT.match(p.name) for p in (tmp_path / "out").iterdir())
    assert all((tmp_path / f"part{g}" / groups.GROUPS_DIR).is_dir() for g in range(n))  # parts are left alone


def test_a_killed_group_task_reruns_only_its_unfinished_groups(mixed, tmp_path, monkeypatch):
    cfg, folder = replace(mixed, workers=1), str(tmp_path / "part1")
    original = groups._outcome

    def killed_in_group_5(raw, job, writer):
        if job.group.number == 5:
            raise OSError("simulated: the pod was evicted")
        return original(raw, job, writer)

    monkeypatch.setattr(groups, "_outcome", killed_in_group_5)
    with pytest.raises(OSError, match="evicted"):
        prepare_data.run_part(cfg, COMMON, part=1, parts=2, data_part=folder)  # groups 1, 3, 5, 7
    assert not (tmp_path / "part1" / parts.PART_FILE).exists()  # not complete: the merge would refuse it
    monkeypatch.setattr(groups, "_outcome", original)
    again = prepare_data.run_part(cfg, COMMON, part=1, parts=2, data_part=folder)
    assert (again.groups, again.reused) == (4, 2)  # groups 1 and 3 finished before the kill
    prepare_data.run_part(cfg, COMMON, part=0, parts=2, data_part=str(tmp_path / "part0"))
    prepare_data.run(cfg, COMMON, data=str(tmp_path / "out"), parts=[str(tmp_path / "part0"), folder])
    assert output_sums(tmp_path / "out") == GOLDEN_MIXED


def test_the_merge_refuses_missing_incomplete_or_foreign_parts(mixed, tmp_path):
    cfg = replace(mixed, workers=1)
    folders = run_parts(cfg, tmp_path, 3)
    out = str(tmp_path / "out")
    with pytest.raises(StageError, match=r"part \d of 3, but the merge got 2 parts"):
        prepare_data.run(cfg, COMMON, data=out, parts=folders[:2])
    with pytest.raises(StageError, match="part 1 of 3 given twice"):
        prepare_data.run(cfg, COMMON, data=out, parts=[folders[0], folders[1], folders[1]])
    with pytest.raises(StageError, match="made from other inputs or settings"):  # the merge's plan differs
        prepare_data.run(replace(cfg, jpeg_quality=80), COMMON, data=out, parts=folders)

    (tmp_path / "part2" / groups.GROUPS_DIR / "group-000005.tar").write_bytes(b"damaged")
    with pytest.raises(StageError, match=r"group group-000005 is not finished in group part 2 of 3.*--part 2/3"):
        prepare_data.run(cfg, COMMON, data=out, parts=folders)
    (tmp_path / "part2" / parts.PART_FILE).unlink()
    with pytest.raises(StageError, match="holds no complete group part"):
        prepare_data.run(cfg, COMMON, data=out, parts=folders)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_part_numbers_are_checked():
    assert parts.parse_part("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="part"):
            parts.parse_part(bad)


def test_the_cli_runs_a_group_task_and_a_merge(mixed, tmp_path, caplog):
    from llm2clip.cli import main
    from llm2clip.config import to_dict

    sections = ["--common-json", json.dumps(to_dict(COMMON)), "--config-json", json.dumps(to_dict(replace(mixed,
                                                                                                        workers=1)))]
    folders = [str(tmp_path / f"p{g}") for g in range(2)]
    for g, folder in enumerate(folders):
        assert main(["prepare_data", *sections, "--part", f"{g}/2", "--data", folder]) == 0
    assert main(["prepare_data", *sections, "--parts", *folders, "--data", str(tmp_path / "out")]) == 0
    assert output_sums(tmp_path / "out") == GOLDEN_MIXED
    caplog.clear()
    assert main(["prepare_data", *sections, "--parts", folders[0], "--data", str(tmp_path / "bad")]) == 2
    assert "part 0 of 2, but the merge got 1 parts" in caplog.text  # one line, no traceback
