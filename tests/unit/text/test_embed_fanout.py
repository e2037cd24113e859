"""embed_captions fanned out across pods: group tasks (run_part) + a merge give the sidecars and
zero-shot grids of one process byte for byte; the merge loads no model and refuses parts it
cannot trust, naming the group task to re-run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_embed_workers import COMMON, tiny_encoder, write_labelled_shards  # noqa: F401 (a fixture)

from llm2clip.config import EmbedCaptionsConfig
from llm2clip.data import parts
from llm2clip.io import StageError
from llm2clip.stages import embed_captions
from llm2clip.text import embed

CFG = EmbedCaptionsConfig(threads=1, device="cpu", num_workers=1, zeroshot_templates=("a photo of {}.", "a {}"))


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def embed_parts(data, encoder, root, n: int) -> list[str]:
    folders = [str(root / f"part{g}") for g in range(n)]
    for g, folder in enumerate(folders):
        embed_captions.run_part(CFG, COMMON, data=str(data), caption_encoder=encoder, part=g, parts=n,
                                embeddings_part=folder)
    return folders


def test_two_group_parts_and_a_merge_write_the_single_process_output(tiny_encoder, tmp_path, threads,  # noqa: F811
                                                                     monkeypatch):
    data = write_labelled_shards(tmp_path / "data", {"train": [20, 20, 8], "val": [16]})
    single = tmp_path / "single"
    embed_captions.run(CFG, COMMON, data=str(data), caption_encoder=tiny_encoder, embeddings=str(single))
    folders = embed_parts(data, tiny_encoder, tmp_path, 2)
    records = [json.loads((tmp_path / f"part{g}" / parts.PART_FILE).read_text()) for g in range(2)]
    # the pods' shares are assign_work's, as for a pod's workers: part 1 also embeds the prompts
    assert [r["shards"] for r in records] == [["train-000000.tar", "val-000000.tar"],
                                              ["train-000001.tar", "train-000002.tar"]]
    assert [sorted(r["zeroshot"]) for r in records] == [[], ["val"]]

    def no_model(*args, **kwargs):
        raise AssertionError("the merge loaded the encoder")

    monkeypatch.setattr(embed, "load_encoder", no_model)
    merged = tmp_path / "merged"
    result = embed_captions.run(CFG, COMMON, data=str(data), caption_encoder=tiny_encoder, embeddings=str(merged),
                                parts=folders[::-1])
    assert result.sidecars == 4 and result.captions == 2 * 64
    files = sorted(p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(merged).as_posix() for p in merged.rglob("*") if p.is_file())
    for name in files:
        if name.endswith(("_text_embeddings.tar", ".npy", "zeroshot/val.json")):
            assert (single / name).read_bytes() == (merged / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (single, merged))
    assert a == b  # the same manifest: the parts' markers are the sidecars' provenance


def test_the_merge_refuses_unfinished_or_foreign_parts(tiny_encoder, tmp_path, threads):  # noqa: F811
    data = write_labelled_shards(tmp_path / "data", {"train": [6, 6], "val": [6]})
    folders = embed_parts(data, tiny_encoder, tmp_path, 2)
    out = str(tmp_path / "out")
    with pytest.raises(StageError, match="made from other inputs or settings"):  # another dtype: other vectors
        embed_captions.run(replace(CFG, dtype="float32"), COMMON, data=str(data), caption_encoder=tiny_encoder,
                           embeddings=out, parts=folders)
    with pytest.raises(StageError, match=r"part 0 of 1, but the merge got 2 parts|part \d of 2, but the merge got 1"):
        embed_captions.run(CFG, COMMON, data=str(data), caption_encoder=tiny_encoder, embeddings=out,
                           parts=folders[:1])
    damaged = next((tmp_path / "part1").glob("*_text_embeddings.tar"))
    damaged.write_bytes(b"damaged")
    shard = damaged.name.replace("_text_embeddings", "")
    with pytest.raises(StageError, match=rf"sidecar of {shard} is not finished in group part 1 of 2.*--part 1/2"):
        embed_captions.run(CFG, COMMON, data=str(data), caption_encoder=tiny_encoder, embeddings=out, parts=folders)
    assert not (tmp_path / "out" / "manifest.json").exists()
    # the group task's rerun redoes only what was damaged, then the merge goes through
    again = embed_captions.run_part(CFG, COMMON, data=str(data), caption_encoder=tiny_encoder, part=1, parts=2,
                                    embeddings_part=folders[1])
    assert again["made"] == 1 and again["kept"] == len(again["shards"]) - 1
    embed_captions.run(CFG, COMMON, data=str(data), caption_encoder=tiny_encoder, embeddings=out, parts=folders)
    assert (tmp_path / "out" / "manifest.json").is_file()
