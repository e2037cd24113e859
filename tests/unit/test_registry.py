"""Registration against a real ``mlflow server`` (sqlite backend; once with S3 on moto).

Covers the alias gate (first version champion, worse stays challenger, better by the margin is
promoted), idempotent reruns, the refusal without metrics, the caption encoder registered once,
and ``models:/<name>@champion`` loaded in a fresh process giving the pipeline's own embeddings.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from llm2clip import registry
from llm2clip.clip_model import encode_text
from llm2clip.io import StageError
from llm2clip.pyfunc import decode_image
from llm2clip.vision.model import LLM2CLIPModel

TOWER = {"kind": "vit_scratch", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "patch_size": 8, "image_size": 32}}
LLM_DIM = 32  # tiny_assets.make_llama hidden size
PRIMARY = "i2t_recall_at_1"
LINEAGE = {"git_rev": "0123abc", "data_sha256": "d" * 64, "params_hash": "p" * 16, "kfp_run_id": "run-1",
           "eval_protocol": "retrieval-v1"}
CAPTIONS = ["a red circle", "a blue square and a green star"]


def _load(path: Path, name: str):
    """Import a test helper by path (tests/ is not a package; several conftest.py exist)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_assets():
    return _load(Path(__file__).parent / "text" / "tiny_assets.py", "registry_tiny_assets")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """Three tiny exported models with different weights."""
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = LLM2CLIPModel.build(TOWER, llm_dim=LLM_DIM, embed_dim=16, adapter_blocks=1)
        out.append(model.save_pretrained(tmp_path_factory.mktemp(f"model{seed}")))
    return out


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A saved caption encoder: a 2-layer random Llama, word tokenizer, settings, stage reports."""
    from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings

    directory = tmp_path_factory.mktemp("caption_encoder")
    _tiny_assets().make_llama(directory, causal_lm=False, hidden=LLM_DIM)
    (directory / SETTINGS_FILE).write_text(json.dumps(EncoderSettings(pooling="mean").to_dict()))
    (directory / "manifest.json").write_text(json.dumps({"stage": "caption_contrastive"}))
    return directory


def png(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def register(uri: str, model: Path, encoder: Path | None, recall: float, name: str, **kwargs):
    metrics = {PRIMARY: recall, "t2i": {"recall_at_1": recall / 2}, "protocol": "retrieval-v1"}
    return registry.register_model(model, encoder, metrics, name=name, primary_metric=PRIMARY,
                                   promote_margin=0.02, tracking_uri=uri, tags=LINEAGE, **kwargs)


def versions(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, uri).search_model_versions(f"name = '{name}'")


# ------------------------------------------------------------------------------- no server


def test_refuses_without_metrics_before_touching_mlflow(models):
    dead = "http://127.0.0.1:9"  # nothing listens: the checks must come first
    kwargs = {"name": "m", "primary_metric": PRIMARY, "tracking_uri": dead}
    with pytest.raises(registry.RegistrationError, match="run the `evaluate` stage"):
        registry.register_model(models[0], None, {}, **kwargs)
    with pytest.raises(ValueError, match=f"primary metric '{PRIMARY}' is not among .*'t2i.recall_at_1'"):
        registry.register_model(models[0], None, {"t2i": {"recall_at_1": 0.5}}, **kwargs)
    with pytest.raises(StageError, match="is nan"):
        registry.register_model(models[0], None, {PRIMARY: float("nan")}, **kwargs)
    with pytest.raises(StageError, match="train_vision"):
        registry.register_model(models[0].parent, None, {PRIMARY: 0.5}, **kwargs)


def test_fingerprints(models, encoder_dir, tmp_path):
    import shutil

    from llm2clip.text.embed import encoder_fingerprint as embedding_fingerprint

    first = registry.encoder_fingerprint(encoder_dir)
    # the same value embed_captions put in the embeddings manifest (and train_vision in the config)
    assert first == embedding_fingerprint(encoder_dir)
    copy = Path(shutil.copytree(encoder_dir, tmp_path / "enc"))
    (copy / "metrics.json").write_text("{}")  # reports do not count
    (copy / "training_curve.png").write_bytes(b"png")
    assert registry.encoder_fingerprint(copy) == first
    (copy / "llm2clip_text_encoder.json").write_text(json.dumps({"pooling": "eos"}))
    assert registry.encoder_fingerprint(copy) != first
    with pytest.raises(registry.RegistrationError, match="caption_contrastive"):
        registry.encoder_fingerprint(models[0])

    sha, config = registry.read_model_dir(models[0])
    base = registry.content_fingerprint(sha, config, {"a": 1.0}, first)
    here = config | {"caption_encoder": {"path": "/here", "fingerprint": "f"}}
    there = config | {"caption_encoder": {"path": "/there", "fingerprint": "f"}}  # moved, same encoder
    assert registry.content_fingerprint(sha, here, {"a": 1.0}, first) == \
        registry.content_fingerprint(sha, there, {"a": 1.0}, first)
    assert registry.content_fingerprint(sha, config, {"a": 1.1}, first) != base
    assert registry.content_fingerprint(sha, config, {"a": 1.0}, "") != base
    assert registry.metric_tag("recall@1") == "metric.recall_at_1"


def test_decode_image_inputs():
    data = png(0)
    reference = np.asarray(decode_image(data))
    assert reference.shape == (30, 40, 3)
    import base64

    assert np.array_equal(np.asarray(decode_image(base64.b64encode(data).decode())), reference)
    assert np.array_equal(np.asarray(decode_image(reference)), reference)
    assert np.asarray(decode_image(reference[..., 0])).shape == (30, 40, 3)
    with pytest.raises(ValueError, match="uint8"):
        decode_image(reference.astype(np.float32))
    with pytest.raises(ValueError, match="could not be decoded"):
        decode_image(b"not an image")


# ------------------------------------------------------------------------------ MLflow server


def test_gate_idempotency_and_shared_encoder(mlflow_server, models, encoder_dir):
    from mlflow.tracking import MlflowClient

    uri, name = mlflow_server, f"llm2clip-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(uri, uri)

    first = register(uri, models[0], encoder_dir, 0.30, name)
    assert (first.version, first.aliases, first.promoted, first.reused) == ("1", ("challenger", "champion"),
                                                                            True, False)
    assert first.champion_before is None and first.champion_after == "1"
    tags = client.get_model_version(name, "1").tags
    assert {k: tags[k] for k in LINEAGE} == LINEAGE
    assert float(tags[f"metric.{PRIMARY}"]) == 0.30 and float(tags["metric.t2i.recall_at_1"]) == 0.15
    assert tags["promotion_decision"] == "promoted" and "no champion" in tags["promotion_reason"]
    assert tags["caption_encoder_model"] == f"{name}-caption-encoder"
    assert tags["loss"] == "clip" and tags["tower"]  # what trained the model
    assert tags["caption_encoder_version"] == "1"
    assert tags["caption_encoder_fingerprint"] == registry.encoder_fingerprint(encoder_dir)
    assert tags["content_fingerprint"] == first.fingerprint

    worse = register(uri, models[1], encoder_dir, 0.31, name)  # better, but not by the margin 0.02
    assert (worse.version, worse.aliases, worse.promoted) == ("2", ("challenger",), False)
    assert worse.champion_after == "1" and worse.champion_before_metric == pytest.approx(0.30)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert "does not beat champion v1" in client.get_model_version(name, "2").tags["promotion_reason"]

    better = register(uri, models[2], encoder_dir, 0.40, name)
    assert (better.version, better.aliases, better.promoted) == ("3", ("challenger", "champion"), True)
    assert (better.champion_before, better.champion_after) == ("1", "3")

    again = register(uri, models[2], encoder_dir, 0.40, name)  # same inputs: same version
    assert (again.version, again.reused, again.promoted) == ("3", True, True)
    assert again.fingerprint == better.fingerprint
    rerun_first = register(uri, models[0], encoder_dir, 0.30, name)
    assert (rerun_first.version, rerun_first.reused, rerun_first.aliases) == ("1", True, ())
    assert len(versions(uri, name)) == 3

    # An interrupted registration (version created, no decision yet) is finished, not duplicated.
    client.delete_model_version_tag(name, "2", "promotion_decision")
    resumed = register(uri, models[1], encoder_dir, 0.31, name)
    assert (resumed.version, resumed.reused, resumed.promoted) == ("2", False, False)
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert len(versions(uri, name)) == 3

    encoders = versions(uri, f"{name}-caption-encoder")
    assert len(encoders) == 1  # one encoder, shared by the three vision versions
    assert {client.get_model_version(name, v).tags["caption_encoder_version"] for v in "123"} == {"1"}

    # Without a caption encoder: a model that only embeds images (and different content).
    image_only = register(uri, models[0], None, 0.10, name)
    assert image_only.version == "4" and image_only.caption_encoder_uri == "" and not image_only.promoted


_FRESH = """
import base64, json, os, sys
import mlflow, numpy as np, pandas as pd
from mlflow.pyfunc.scoring_server import infer_and_parse_data
from PIL import Image
model = mlflow.pyfunc.load_model(f"models:/{os.environ['NAME']}@champion")
import llm2clip
images = [open(p, "rb").read() for p in sys.argv[2:]]
captions = json.loads(os.environ["CAPTIONS"])
frame = pd.DataFrame({"image": images + [None] * len(captions), "caption": [None] * len(images) + captions})
out = model.predict(frame)
array = model.predict(pd.DataFrame({"image": [np.asarray(Image.open(sys.argv[2]))]}))
# What a serving endpoint does with JSON (binary columns arrive base64-encoded).
schema = model.metadata.get_input_schema()
split = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]}}
records = {"dataframe_records": [{"caption": c} for c in captions]}
served_images = model.predict(infer_and_parse_data(split, schema))
served_text = model.predict(infer_and_parse_data(records, schema), params={"batch_size": 1})
json.dump({"image": out["image_embedding"].tolist()[: len(images)],
           "text": out["text_embedding"].tolist()[len(images):],
           "array": array["image_embedding"].tolist(), "llm2clip": llm2clip.__file__,
           "served_image": served_images["image_embedding"].tolist(),
           "served_text": served_text["text_embedding"].tolist(),
           "schema": schema.input_names()}, open(sys.argv[1], "w"))
"""


def test_champion_in_fresh_process(mlflow_server, models, encoder_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, name = mlflow_server, f"llm2clip-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(uri, uri)
    run = client.create_run(client.create_experiment(name), run_name="register")  # the stage's run
    result = register(uri, models[1], encoder_dir, 0.5, name, run_id=run.info.run_id)
    assert client.get_model_version(name, result.version).run_id == run.info.run_id
    assert len(client.get_run(run.info.run_id).outputs.model_outputs) == 2  # encoder + vision
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"{seed}.png")
        paths[-1].write_bytes(png(seed, size=(40 + 8 * seed, 30)))
    out = tmp_path / "out.json"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "NAME": name, "CAPTIONS": json.dumps(CAPTIONS)}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", _FRESH, str(out), *map(str, paths)], env=env, cwd=tmp_path,
                   check=True, timeout=600)
    got = json.loads(out.read_text())

    assert got["schema"] == ["image", "caption"]
    assert "/code/llm2clip/" in got["llm2clip"]  # the package came with the model (code_paths)
    model = LLM2CLIPModel.from_pretrained(models[1], caption_encoder=str(encoder_dir))
    expected_images = model.encode_image([Image.open(p) for p in paths]).numpy()
    np.testing.assert_allclose(np.array(got["image"]), expected_images, atol=1e-5)
    np.testing.assert_allclose(np.array(got["array"]), expected_images[:1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got["image"], axis=1), 1.0, atol=1e-5)
    expected_text = encode_text(model, CAPTIONS).numpy()
    np.testing.assert_allclose(np.array(got["text"]), expected_text, atol=1e-5)
    np.testing.assert_allclose(np.array(got["served_image"]), expected_images, atol=1e-5)
    np.testing.assert_allclose(np.array(got["served_text"]), expected_text, atol=1e-5)


def test_s3_artifact_store(s3_bucket, models, encoder_dir, tmp_path):
    """Proxied mode: the server writes artifacts to S3 (moto); the client needs no AWS settings."""
    import boto3

    servers = _load(Path(__file__).parents[1] / "conftest.py", "registry_root_conftest")
    endpoint, bucket = s3_bucket
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_S3_ENDPOINT_URL": endpoint}
    proc, uri = servers.start_mlflow_server(tmp_path / "server", extra_env=env, artifacts=f"s3://{bucket}/mlflow")
    try:
        name = "llm2clip-s3"
        first = register(uri, models[0], encoder_dir, 0.3, name)
        second = register(uri, models[2], encoder_dir, 0.6, name)
        assert (first.version, second.version, second.champion_after) == ("1", "2", "2")
        assert len(versions(uri, f"{name}-caption-encoder")) == 1
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
            Bucket=bucket, Prefix="mlflow/")["Contents"]]
        assert sum(k.endswith("model.safetensors") for k in keys) == 3  # 2 vision + 1 encoder
        champion = registry.load_champion(name, uri)
        got = champion.predict(pd.DataFrame({"image": [png(3)], "caption": [CAPTIONS[0]]}))
        model = LLM2CLIPModel.from_pretrained(models[2], caption_encoder=str(encoder_dir))
        np.testing.assert_allclose(np.array(got["image_embedding"].tolist()),
                                   model.encode_image([decode_image(png(3))]).numpy(), atol=1e-5)
        np.testing.assert_allclose(np.array(got["text_embedding"].tolist()),
                                   encode_text(model, CAPTIONS[:1]).numpy(), atol=1e-5)
    finally:
        servers.stop(proc)
