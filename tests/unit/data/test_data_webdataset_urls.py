"""Webdataset URL lists (issue 11, defect 5): brace alternatives ``{a,b}`` were split at their
comma before brace expansion (``UnbalancedBracesError``)."""

from __future__ import annotations

import io
import tarfile

import bad_inputs as B
import pytest

from llm2clip.config import WebDatasetSource
from llm2clip.data.sources import check_caption_mapping, expand_urls, iter_webdataset, split_urls
from llm2clip.io import StageError


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        ("s3://b/{a,b}.tar", ["s3://b/a.tar", "s3://b/b.tar"]),
        ("/x/{00..03}.tar", ["/x/00.tar", "/x/01.tar", "/x/02.tar", "/x/03.tar"]),
        ("/x/{a,b}-{0..1}.tar", ["/x/a-0.tar", "/x/a-1.tar", "/x/b-0.tar", "/x/b-1.tar"]),
        ("a.tar, b.tar,,c.tar", ["a.tar", "b.tar", "c.tar"]),
        ("s3://b/{x,y}.tar,/l/{000..001}.tar", ["s3://b/x.tar", "s3://b/y.tar", "/l/000.tar", "/l/001.tar"]),
        ("/x/{a,{b,c}}.tar", ["/x/a.tar", "/x/b.tar", "/x/c.tar"]),
    ],
)
def test_brace_alternatives_ranges_and_comma_lists_expand(urls, expected):
    assert expand_urls(urls) == expected


def test_commas_are_split_only_outside_braces():
    assert split_urls("a/{x,y}.tar,b/{0..2}.tar") == ["a/{x,y}.tar", "b/{0..2}.tar"]
    assert split_urls(r"a\{x,y.tar") == [r"a\{x", "y.tar"]  # an escaped brace opens nothing


@pytest.mark.parametrize("urls", ["s3://b/{a,b.tar", "/x/a}.tar", "/x/{0..2}}.tar,/y.tar", "{"])
def test_unbalanced_braces_are_a_stage_error_naming_the_urls(urls):
    with pytest.raises(StageError, match="unbalanced braces") as err:
        expand_urls(urls)
    assert repr(urls) in str(err.value)
    with pytest.raises(StageError, match="unbalanced braces"):  # before any output is touched
        check_caption_mapping((WebDatasetSource(urls=urls, caption_fields={"short": "txt"}),), ("short",))


def test_shards_named_by_brace_alternatives_are_all_read(tmp_path):
    for name in ("left", "right"):
        with tarfile.open(tmp_path / f"{name}.tar", "w") as tar:
            for member, data in [(f"{name}.jpg", B.good_jpeg()), (f"{name}.txt", name.encode())]:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    src = WebDatasetSource(urls=str(tmp_path / "{left,right}.tar"), caption_fields={"short": "txt"})
    samples = list(iter_webdataset(src))
    assert [(s.key, s.captions["short"], s.error) for s in samples] == [
        ("webdataset-left", "left", None),
        ("webdataset-right", "right", None),
    ]
