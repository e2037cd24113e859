"""llm2clip.contracts: one writer and one reader of every stage's manifest.json.

Per stage: a write + read round trip in the on-disk format the stages wrote before (sorted,
indented JSON); a missing manifest, another stage's, a future format version and a missing
required field are each one line that names the stage to re-run. Last, a walk over ``llm2clip/``
(``ast``; nothing imported) proves no other module writes a file named ``manifest.json``.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from llm2clip import contracts
from llm2clip.contracts import CONTRACTS, MANIFEST, read_manifest, rerun, write_manifest
from llm2clip.io import StageError

REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare_data", "caption_contrastive", "embed_captions", "train_vision", "evaluate", "register")


def body_of(stage: str) -> dict:
    """A body with every field the contract names (values are placeholders)."""
    c = CONTRACTS[stage]
    return {field: {"of": field} for field in (*c.required, *c.written)}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_every_stage_has_a_contract():
    assert tuple(CONTRACTS) == STAGES
    assert all(c.format_version == 1 for c in CONTRACTS.values())  # today's versions, unchanged
    with pytest.raises(ValueError, match="no manifest contract for stage 'nope'; known: prepare_data"):
        contracts.contract("nope")


@pytest.mark.parametrize("stage", STAGES)
def test_round_trip_in_the_existing_format(stage, tmp_path):
    written = write_manifest(stage, tmp_path / "out", body_of(stage))
    assert written == {**body_of(stage), "stage": stage, "format_version": 1}
    text = (tmp_path / "out" / MANIFEST).read_text()
    assert text == json.dumps(written, indent=2, sort_keys=True) + "\n"  # as atomic_write_json wrote it
    assert read_manifest(stage, tmp_path / "out") == written
    assert read_manifest(stage, str(tmp_path / "out" / MANIFEST)) == written  # the file's path works too
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name != MANIFEST]  # no temp file left


@pytest.mark.parametrize("stage", STAGES)
def test_a_missing_manifest_names_the_stage_to_run(stage, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError) as err:
        read_manifest(stage, tmp_path / "out")
    message = one_line(err)
    assert message == (f"{tmp_path / 'out' / MANIFEST} not found: {tmp_path / 'out'} has no manifest.json "
                       f"({stage} has not finished there); run {stage} first: `dvc repro {stage}` "
                       f"(KFP: the {stage} task)")


@pytest.mark.parametrize("stage", STAGES)
def test_another_stages_output_is_refused(stage, tmp_path):
    other = STAGES[(STAGES.index(stage) + 1) % len(STAGES)]
    write_manifest(other, tmp_path, body_of(other) | body_of(stage))
    with pytest.raises(StageError) as err:
        read_manifest(stage, tmp_path)
    message = one_line(err)
    article = "an" if stage[0] in "aeiou" else "a"
    assert message.startswith(f"{tmp_path} is not {article} {stage} v1 output: it is a {other!r} output, "
                              f"not {CONTRACTS[stage].noun}, and so it is not {article} {stage} output")
    assert message.endswith(f"pass the {stage} output, or {rerun(stage)} if there is none")


@pytest.mark.parametrize("stage", STAGES)
def test_a_future_format_version_is_refused(stage, tmp_path):
    write_manifest(stage, tmp_path, body_of(stage))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps(manifest | {"format_version": 2}))
    with pytest.raises(StageError) as err:
        read_manifest(stage, tmp_path)
    assert one_line(err) == (f"{tmp_path} is not {'an' if stage[0] in 'aeiou' else 'a'} {stage} v1 output: its "
                             f"manifest says format 2, which this code does not read; {rerun(stage)} with this code")


@pytest.mark.parametrize("stage", [s for s in STAGES if CONTRACTS[s].required])
def test_a_missing_required_field_is_refused(stage, tmp_path):
    write_manifest(stage, tmp_path, body_of(stage))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    field = CONTRACTS[stage].required[-1]
    del manifest[field]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StageError) as err:
        read_manifest(stage, tmp_path)
    assert one_line(err).endswith(f"output: its manifest lacks {field}; {rerun(stage)}")


def test_only_what_readers_need_is_required_on_read(tmp_path):
    """Hand-made and older manifests with fewer fields read; the writer records them all."""
    (tmp_path / MANIFEST).write_text(json.dumps({"stage": "prepare_data", "format_version": 1,
                                                 "caption_fields": ["short"], "shards": {"train": []}}))
    assert read_manifest("prepare_data", tmp_path)["shards"] == {"train": []}
    body = body_of("prepare_data")
    del body["quarantine"]
    with pytest.raises(ValueError, match="prepare_data manifest lacks quarantine"):
        write_manifest("prepare_data", tmp_path / "new", body)
    assert not (tmp_path / "new" / MANIFEST).exists()


def test_the_writer_stamps_stage_and_version_and_refuses_others(tmp_path):
    body = body_of("evaluate")
    stated = body | {"stage": "evaluate", "format_version": 1}  # what the contract stamps anyway: accepted
    assert write_manifest("evaluate", tmp_path, stated) == stated
    with pytest.raises(ValueError, match="stage 'register' given, the contract says 'evaluate'"):
        write_manifest("evaluate", tmp_path, body | {"stage": "register"})
    with pytest.raises(ValueError, match="format_version 2 given"):
        write_manifest("evaluate", tmp_path, body | {"format_version": 2})


def test_an_unversioned_caption_encoder_reads_as_version_1(tmp_path):
    """caption_contrastive wrote no format_version before the contracts; its outputs still read."""
    (tmp_path / MANIFEST).write_text(json.dumps({"stage": "caption_contrastive", "settings": {}}))
    assert read_manifest("caption_contrastive", tmp_path) == {"stage": "caption_contrastive", "settings": {}}
    assert "format_version" in write_manifest("caption_contrastive", tmp_path / "new", body_of("caption_contrastive"))
    (tmp_path / MANIFEST).write_text(json.dumps({"stage": "evaluate", **body_of("evaluate")}))
    with pytest.raises(StageError, match="manifest says format None, which this code does not read"):
        read_manifest("evaluate", tmp_path)


def test_a_manifest_that_is_no_json_object_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StageError, match=r"manifest.json is not valid JSON .*; " + re.escape(rerun("register"))):
        read_manifest("register", tmp_path)
    (tmp_path / MANIFEST).write_text("[1]")
    with pytest.raises(StageError, match="its manifest is not a JSON object"):
        read_manifest("register", tmp_path)


def test_remove_has_and_mirror(tmp_path):
    write_manifest("register", tmp_path / "out", body_of("register"))
    assert contracts.has_manifest(tmp_path / "out")
    contracts.mirror_manifest(tmp_path / "out", tmp_path / "copy")
    assert (tmp_path / "copy" / MANIFEST).read_bytes() == (tmp_path / "out" / MANIFEST).read_bytes()
    assert contracts.remove_manifest(tmp_path / "out") is True
    assert not contracts.has_manifest(tmp_path / "out") and contracts.remove_manifest(tmp_path / "out") is False
    with pytest.raises(StageError, match="not found: the stage that writes"):
        contracts.mirror_manifest(tmp_path / "out", tmp_path / "copy")


def test_s3_round_trip(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/runs/emb"
    with pytest.raises(StageError, match=rf"s3://{bucket}/runs/emb/manifest.json not found: .* run embed_captions"):
        read_manifest("embed_captions", url, endpoint)
    written = write_manifest("embed_captions", url, body_of("embed_captions"), endpoint)
    assert contracts.has_manifest(url, endpoint)
    assert read_manifest("embed_captions", url + "/", endpoint) == written
    contracts.mirror_manifest(url, tmp_path / "kfp", endpoint)  # what a KFP task does for an s3:// output
    assert json.loads((tmp_path / "kfp" / MANIFEST).read_text()) == written
    with pytest.raises(StageError, match=f"s3://{bucket}/runs/emb is not a train_vision v1 output"):
        read_manifest("train_vision", url, endpoint)
    assert contracts.remove_manifest(url, endpoint) and not contracts.has_manifest(url, endpoint)


# ------------------------------------------------------------------------ the only writer

WRITERS = {"atomic_write_json", "atomic_write_text", "atomic_write_bytes", "atomic_path", "write_text",
           "write_bytes", "pipe", "pipe_file", "put", "put_file", "copy", "copy2", "copyfile", "copytree",
           "link", "symlink", "symlink_to", "hardlink_to", "rename", "replace", "move", "dump", "upload_file"}
OPENERS = {"open"}


def _names_manifest(node: ast.AST, constants: dict[str, str]) -> bool:
    """Whether ``node``'s subtree spells a path that ends in manifest.json (literal, f-string or constant)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value.endswith(MANIFEST):
            return True
        if isinstance(sub, ast.Name) and constants.get(sub.id, "").endswith(MANIFEST):
            return True
        if isinstance(sub, ast.Attribute) and constants.get(sub.attr, "").endswith(MANIFEST):
            return True
    return False


def _writes_mode(call: ast.Call) -> bool:
    modes = [a for a in call.args[1:2]] + [k.value for k in call.keywords if k.arg == "mode"]
    return any(isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wax+")
               for m in modes)


def manifest_writes(source: str, constants: dict[str, str] | None = None) -> list[int]:
    """Lines of ``source`` that write a file named manifest.json."""
    tree = ast.parse(source)
    constants = dict(constants or {})
    for node in ast.walk(tree):  # NAME = "manifest.json" anywhere in the module
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            constants.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in WRITERS or (name in OPENERS and _writes_mode(node)):
            if _names_manifest(node, constants):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_the_walk_finds_the_ways_a_manifest_is_written():
    written = '''
import json, shutil
M = "manifest.json"
atomic_write_json(out / "manifest.json", body)
(out / "manifest.json").write_text(text)
Path(out, M).write_bytes(data)
fs.pipe_file(f"{url}/manifest.json", data)
with open(out / "manifest.json", "w") as f: json.dump(body, f)
shutil.copy2(src, dst / "manifest.json")
'''
    assert manifest_writes(written) == [4, 5, 6, 7, 8, 9]
    read = '''
json.loads((out / "manifest.json").read_text())
with open(out / "manifest.json") as f: pass
(out / "manifest.json").unlink(missing_ok=True)
tracker.log_artifact(out / "manifest.json")
'''
    assert manifest_writes(read) == []


def test_contracts_is_the_only_writer_of_manifest_json():
    shared = {"MANIFEST": MANIFEST}  # llm2clip.contracts.MANIFEST, imported by name elsewhere
    found = []
    for file in sorted((REPO / "llm2clip").rglob("*.py")):
        rel = file.relative_to(REPO).as_posix()
        if rel == "llm2clip/contracts.py":
            continue
        found += [f"{rel}:{line}" for line in manifest_writes(file.read_text(), shared)]
    assert not found, ("these write manifest.json themselves; write it through llm2clip.contracts.write_manifest "
                       "(or mirror_manifest for a byte copy):\n" + "\n".join(found))
    assert manifest_writes((REPO / "llm2clip" / "contracts.py").read_text())  # the walk sees the real writer
