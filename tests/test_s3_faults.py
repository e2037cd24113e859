"""Object-store faults: the real S3 client (s3fs + botocore) against the real S3 API (moto) behind
a fault-injecting proxy (tests/s3_faults.py).

- throttling (503 SlowDown), server errors (500) and dropped connections during shard and sidecar
  writes and reads are retried with backoff (``llm2clip.io.S3_RETRIES``, botocore's standard
  mode) and the output is byte-identical to a run without faults;
- a store that keeps failing, or is gone, ends the stage with one clear line, and nothing at the
  target reads as complete: no ``manifest.json``, so every later stage refuses it as unfinished.
"""

import json
import logging
from dataclasses import replace

import boto3
import pytest
from s3_faults import FaultProxy, Rule
from tiny_pipeline import tiny_assets

from llm2clip.cli import main
from llm2clip.config import CommonConfig, EmbedCaptionsConfig, PrepareDataConfig, SyntheticSource, to_dict
from llm2clip.data.shards import load_manifest
from llm2clip.io import StageError
from llm2clip.stages import embed_captions, prepare_data

COMMON = CommonConfig(tracking=False)
CFG = PrepareDataConfig(sources=(SyntheticSource(name="scenes", count=40, image_size=48),), shard_size=10,
                        image_max_side=48, workers=1)


@pytest.fixture()
def proxy(s3_server):
    p = FaultProxy(s3_server)
    yield p
    p.stop()


def shard_sums(manifest: dict) -> dict[str, str]:
    return {s["name"]: s["sha256"] for split in manifest["shards"].values() for s in split}


def keys(endpoint: str, bucket: str, prefix: str) -> set[str]:
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"].removeprefix(prefix) for o in listed.get("Contents", [])}


def test_throttling_errors_and_drops_are_retried_and_change_nothing(proxy, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    proxy.rules = [Rule(503, "PUT", times=2), Rule("drop", "PUT", times=1), Rule(500, "GET", times=1),
                   Rule(503, "HEAD", times=1)]
    prepare_data.run(CFG, replace(COMMON, s3_endpoint_url=proxy.endpoint), data=f"s3://{bucket}/out")
    prepare_data.run(CFG, COMMON, data=str(tmp_path / "local"))
    assert proxy.fired() == 5  # every fault happened, and was ridden out
    remote = load_manifest(f"s3://{bucket}/out", endpoint)
    assert shard_sums(remote) == shard_sums(load_manifest(str(tmp_path / "local")))


def test_a_store_that_keeps_failing_is_one_error_line_and_nothing_looks_complete(proxy, s3_bucket, caplog):
    endpoint, bucket = s3_bucket
    proxy.rules = [Rule(500, "PUT", path=r"manifest\.json")]  # every try of the commit mark fails
    common = to_dict(replace(COMMON, s3_endpoint_url=proxy.endpoint))
    code = main(["prepare_data", "--common-json", json.dumps(common), "--config-json", json.dumps(to_dict(CFG)),
                 "--data", f"s3://{bucket}/out"])
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None and "InternalError" in errors[0].getMessage(), [
        r.getMessage() for r in errors]
    assert proxy.fired() >= 5  # botocore's attempts (and s3fs's) before giving up
    assert "manifest.json" not in keys(endpoint, bucket, "out/")
    with pytest.raises(StageError, match="not finished|not found"):
        load_manifest(f"s3://{bucket}/out", endpoint)


def test_a_store_that_is_gone_is_one_error_line(proxy, s3_bucket, caplog):
    _, bucket = s3_bucket
    endpoint = proxy.endpoint
    proxy.stop()  # connection refused from now on
    common = to_dict(replace(COMMON, s3_endpoint_url=endpoint))
    code = main(["prepare_data", "--common-json", json.dumps(common), "--config-json", json.dumps(to_dict(CFG)),
                 "--data", f"s3://{bucket}/out"])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and errors[0].exc_info is None
    assert endpoint.removeprefix("http://") in errors[0].getMessage() or "endpoint" in errors[0].getMessage().lower()
    proxy.stop = lambda: None  # already stopped


def test_sidecar_writes_ride_out_faults(proxy, s3_bucket, tmp_path):
    """embed_captions into S3 with throttled and dropped uploads: the same sidecars as locally."""
    endpoint, bucket = s3_bucket
    data = str(tmp_path / "data")
    prepare_data.run(CFG, COMMON, data=data)
    encoder = tiny_assets.make_llama(tmp_path / "encoder", causal_lm=False)
    from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings

    (encoder / SETTINGS_FILE).write_text(json.dumps(EncoderSettings(prompt_template="{text}").to_dict()))
    cfg = EmbedCaptionsConfig(device="cpu", num_workers=1, threads=1, zeroshot_splits=())
    proxy.rules = [Rule(503, "PUT", times=2), Rule("drop", "PUT", times=2)]
    embed_captions.run(cfg, replace(COMMON, s3_endpoint_url=proxy.endpoint), data=data, caption_encoder=str(encoder),
                       embeddings=f"s3://{bucket}/emb")
    embed_captions.run(cfg, COMMON, data=data, caption_encoder=str(encoder), embeddings=str(tmp_path / "emb"))
    assert proxy.fired() == 4
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for name in [p.name for p in (tmp_path / "emb").glob("*_text_embeddings.tar")]:
        got = s3.get_object(Bucket=bucket, Key=f"emb/{name}")["Body"].read()
        assert got == (tmp_path / "emb" / name).read_bytes(), name
    assert "manifest.json" in keys(endpoint, bucket, "emb/")
