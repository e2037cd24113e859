"""caption_contrastive.text_pairs: reading E5-style files, and mixing them into the batches."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from llm2clip.config import ConfigError, load_params
from llm2clip.config.caption_contrastive import TextPairSource
from llm2clip.text.contrastive import PairSampler
from llm2clip.text.pairs import TextPair, load_text_pairs, read_text_pairs, split_evenly

IMAGES = [[("short", f"s{i}"), ("dense", f"d{i}")] for i in range(24)]
PAIRS = [TextPair(f"q{i}", f"p{i}", f"n{i}" if i % 2 else "", "search: ") for i in range(20)]


def write_jsonl(path, rows, compress=False):
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


def test_jsonl_with_default_columns_optional_negatives_and_empty_rows(tmp_path):
    path = write_jsonl(tmp_path / "nli.jsonl", [
        {"query": "a dog runs", "positive": "an animal moves", "negative": "a cat sleeps"},
        {"query": "two men talk", "positive": "people speak", "other": 1},  # no negative
        {"query": "  ", "positive": "nothing to retrieve"},  # empty query: skipped
    ])
    pairs, summary = read_text_pairs(TextPairSource(path=path), default_instruction="Retrieve: ")
    assert pairs == [TextPair("a dog runs", "an animal moves", "a cat sleeps", "Retrieve: "),
                     TextPair("two men talk", "people speak", "", "Retrieve: ")]
    assert summary == {"path": path, "pairs": 2, "with_negative": 1, "skipped": 1}


def test_column_mapping_own_instruction_and_gzip(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl.gz", [{"question": "why is the sky blue", "answer": "rayleigh"}],
                       compress=True)
    source = TextPairSource(path=path, query="question", positive="answer", negative="", instruction="")
    pairs, _ = read_text_pairs(source, default_instruction="ignored: ")
    assert pairs == [TextPair("why is the sky blue", "rayleigh", "", "")]


def test_a_missing_column_names_the_row_and_the_mapping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positive": "p"}, {"q": "x", "positive": "p"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no column 'query' \(the columns are \['positive', 'q'\]; "
                                         r"map yours with caption_contrastive.text_pairs\[\].query"):
        read_text_pairs(TextPairSource(path=path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"q": ["a red star", "a blue cat"], "pos": ["red star", "blue cat"]}), path)
    pairs, summaries = load_text_pairs([TextPairSource(path=str(path), query="q", positive="pos")], "i: ")
    assert pairs == [TextPair("a red star", "red star", "", "i: "), TextPair("a blue cat", "blue cat", "", "i: ")]
    assert summaries[0]["pairs"] == 2 and summaries[0]["with_negative"] == 0


def test_config_checks():
    ok = load_params(None, ["caption_contrastive.text_pairs=[{path: s3://b/e5.parquet, query: q}]",
                            "caption_contrastive.text_pair_ratio=0.25"]).caption_contrastive
    assert ok.text_pairs == (TextPairSource(path="s3://b/e5.parquet", query="q"),)
    for overrides, message in [
        (["caption_contrastive.text_pair_ratio=0.25"], "go together"),
        (["caption_contrastive.text_pairs=[{path: a.jsonl}]"], "go together"),
        (["caption_contrastive.text_pairs=[{path: a.csv}]", "caption_contrastive.text_pair_ratio=0.5"],
         r"text_pairs\[0\].path: must end in one of"),
        (["caption_contrastive.text_pairs=[{path: a.jsonl}]", "caption_contrastive.text_pair_ratio=1"],
         r"text_pair_ratio: must be in \[0, 1\)"),
        (["caption_contrastive.text_pairs=[{path: a.jsonl, colums: x}]", "caption_contrastive.text_pair_ratio=.5"],
         r"unknown key caption_contrastive.text_pairs\[0\].colums"),
        (["caption_contrastive.init_adapters=['']"], r"init_adapters\[0\]: must be a local adapter directory"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_params(None, overrides)


def test_split_evenly_covers_the_total():
    for total, parts in ((0, 2), (3, 2), (5, 4), (8, 3)):
        runs = [split_evenly(total, parts, r) for r in range(parts)]
        assert sum(n for _, n in runs) == total and [o for o, _ in runs] == sorted(o for o, _ in runs)
        assert max(n for _, n in runs) - min(n for _, n in runs) <= 1


@pytest.mark.parametrize(("ratio", "text_per_step", "per_rank"), [(0.25, 2, [1, 1]), (0.375, 3, [1, 2])])
def test_ratio_instructions_and_distinct_items(ratio, text_per_step, per_rank):
    sampler = PairSampler(IMAGES, batch_size=4, world_size=2, seed=3, instruction="caption: ",
                          text_pairs=PAIRS, text_ratio=ratio)
    assert (sampler.text_per_step, sampler.captions_per_step) == (text_per_step, 8 - text_per_step)
    for step in range(1, 12):
        batches = [sampler.batch(step, r) for r in range(2)]
        texts = [b.instructions.count("search: ") for b in batches]
        assert texts == per_rank
        for b in batches:
            assert len(b.queries) == len(b.positives) == len(b.negatives) == len(b.instructions) == 4
            n = 4 - b.instructions.count("search: ")
            assert b.instructions == ["caption: "] * n + ["search: "] * (4 - n)  # captions first
        queries = [q for b in batches for q in b.queries]
        assert len(set(queries)) == 8  # no image and no pair twice in a global batch


def test_every_pair_once_per_text_epoch_and_negatives():
    sampler = PairSampler(IMAGES, batch_size=4, world_size=2, seed=0, text_pairs=PAIRS, text_ratio=0.5)
    assert sampler.text.steps_per_epoch == 5  # 20 pairs, 4 per step
    seen = Counter()
    for step in range(1, 6):
        for rank in range(2):
            b = sampler.batch(step, rank)
            for q, p, n, i in zip(b.queries, b.positives, b.negatives, b.instructions, strict=True):
                if i != "search: ":
                    continue
                seen[q] += 1
                k = int(q[1:])
                assert p == f"p{k}"
                if k % 2:
                    assert n == f"n{k}"  # its own negative
                else:
                    assert n.startswith("p") and n != p  # another pair's positive
    assert seen == Counter({p.query: 1 for p in PAIRS})


def test_batches_are_a_pure_function_of_seed_step_rank():
    """What a resumed run relies on: a new sampler asked for step k in any order gives the same batch."""
    make = lambda seed: PairSampler(IMAGES, batch_size=4, world_size=2, seed=seed,  # noqa: E731
                                    text_pairs=PAIRS, text_ratio=0.25)
    uninterrupted = make(7)
    expected = {(s, r): uninterrupted.batch(s, r) for s in range(1, 25) for r in range(2)}
    resumed = make(7)
    for step, rank in sorted(expected, reverse=True):  # another order, another instance
        assert resumed.batch(step, rank) == expected[step, rank]
    assert make(8).batch(1, 0) != expected[1, 0]
    assert expected[1, 0] != expected[1 + uninterrupted.text.steps_per_epoch * 2, 0]  # new epochs reshuffle


def test_too_few_pairs_or_a_ratio_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="lower text_pair_ratio or add pairs"):
        PairSampler(IMAGES, batch_size=4, world_size=2, seed=0, text_pairs=PAIRS[:3], text_ratio=0.5)
    with pytest.raises(ValueError, match="is no text pair at all"):
        PairSampler(IMAGES, batch_size=4, world_size=2, seed=0, text_pairs=PAIRS, text_ratio=0.05)
