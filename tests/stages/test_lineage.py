"""Lineage: every stage that consumes inputs refuses inputs that do not belong together, and the
refusal names what differs and the stage to re-run (issue 11, "Lineage checks everywhere").

One tiny chain serves the module: two prepared data sets, three tiny random Llama caption
encoders (two 32-wide, one 48-wide) saved as caption_contrastive writes them, their embeddings
of the first data set, and a vision model exported with the lineage train_vision records (its
``check_inputs`` + ``build_model``; no training, so no DeepSpeed engine in this process). A
mismatch is made by copying an output and editing its manifest, or by swapping one input for
another run's.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llm2clip.config import (
    CaptionContrastiveConfig,
    CommonConfig,
    EmbedCaptionsConfig,
    EvalSet,
    EvaluateConfig,
    PrepareDataConfig,
    RegisterConfig,
    SyntheticSource,
    TrainVisionConfig,
    ValidationConfig,
)
from llm2clip.io import StageError
from llm2clip.stages import STAGES, caption_contrastive, embed_captions, evaluate, prepare_data, register, train_vision
from llm2clip.stages import train_vision_io as vision_artifacts
from llm2clip.text.embed import encoder_fingerprint
from llm2clip.text.encoder import SETTINGS_FILE, EncoderSettings

_spec = importlib.util.spec_from_file_location(
    "lineage_tiny_assets", Path(__file__).resolve().parents[1] / "unit" / "text" / "tiny_assets.py")
tiny_assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_assets)

OFF = CommonConfig(tracking=False)
TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8}
VISION = TrainVisionConfig(tower="vit_scratch", tower_config=TINY_VIT, image_size=32, embed_dim=16,
                           adapter_blocks=1, batch_size=8, max_steps=1, warmup_steps=0, workers=0)
EMBED = EmbedCaptionsConfig(device="cpu", threads=1, num_workers=1, zeroshot_templates=("a {}",))


@dataclass(frozen=True)
class Chain:
    """The module's upstream outputs (all directories)."""

    root: Path
    data: str
    other_data: str
    encoder: str
    other_encoder: str
    wide_encoder: str
    embeddings: str
    other_embeddings: str
    wide_embeddings: str
    vision_model: str
    report: str


def _prepare(out: Path, count: int) -> str:
    prepare_data.run(PrepareDataConfig(
        sources=(SyntheticSource(name="scenes", count=count, image_size=48),), val_fraction=0.25,
        shard_size=16, image_max_side=48, validation=ValidationConfig(min_valid_fraction=0.5)), OFF, data=str(out))
    return str(out)


def _encoder(out: Path, seed: int, hidden: int = 32) -> str:
    """A tiny random Llama saved as caption_contrastive writes its output (settings + manifest)."""
    tiny_assets.make_llama(out, seed=seed, hidden=hidden, causal_lm=False)
    settings = EncoderSettings(padding_side="left").to_dict()
    (out / SETTINGS_FILE).write_text(json.dumps(settings))
    (out / "manifest.json").write_text(json.dumps({"stage": "caption_contrastive", "settings": settings,
                                                   "settings_file": SETTINGS_FILE, "embedding_dim": hidden}))
    return str(out)


def _embed(data: str, encoder: str, out: Path) -> str:
    embed_captions.run(EMBED, OFF, data=data, caption_encoder=encoder, embeddings=str(out))
    return str(out)


def _export_vision(data: str, embeddings: str, out: Path) -> str:
    """A vision model with the lineage train_vision gives it (fingerprint + width of the embeddings)."""
    inputs = vision_artifacts.check_inputs(VISION, OFF, data, embeddings)
    torch.manual_seed(0)
    vision_artifacts.build_model(VISION, inputs).save_pretrained(out)
    (out / "manifest.json").write_text(json.dumps({
        "stage": "train_vision", "format_version": 1,
        "inputs": {"data": {"manifest_sha256": inputs.data_sha256},
                   "embeddings": {"manifest_sha256": inputs.embeddings_sha256,
                                  "encoder_fingerprint": inputs.encoder.get("fingerprint"), "dim": inputs.llm_dim}}}))
    return str(out)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    root = tmp_path_factory.mktemp("lineage")
    data, other_data = _prepare(root / "data", 48), _prepare(root / "other_data", 40)
    encoder, other, wide = (_encoder(root / "encoder", 0), _encoder(root / "other_encoder", 1),
                            _encoder(root / "wide_encoder", 2, hidden=48))
    embeddings = _embed(data, encoder, root / "embeddings")
    vision = _export_vision(data, embeddings, root / "vision")
    evaluate.run(EvaluateConfig(compare_champion=False, batch_size=16), OFF, data=data, embeddings=embeddings,
                 vision_model=vision, report=str(root / "report"))
    return Chain(root, data, other_data, encoder, other, wide, embeddings,
                 _embed(data, other, root / "other_embeddings"), _embed(data, wide, root / "wide_embeddings"),
                 vision, str(root / "report"))


def copy_with_manifest(src: str, dst: Path, **changes) -> str:
    """Copy an output directory and change top-level fields of its manifest."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(manifest | changes))
    return str(dst)


def with_changed_shard(data: str, dst: Path) -> str:
    """A copy of prepared data whose first train shard was replaced after prepare_data."""
    shutil.copytree(data, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    first, second = (s["name"] for s in manifest["shards"]["train"][:2])
    shutil.copyfile(dst / second, dst / first)
    return str(dst)


def assert_refused(run: Callable[[], object], rerun: str, *what: str) -> str:
    """``run`` raises a StageError naming ``what`` differs and the stage ``rerun``; returns the message."""
    with pytest.raises(StageError) as err:
        run()
    message = str(err.value)
    # "re-run `dvc repro <stage>`", or llm2clip.data.shards' "changed after <stage>, rerun it"
    assert re.search(rf"re-?run\b.*\b{rerun}\b|\b{rerun}, re-?run it\b", message), message
    for part in what:
        assert part in message, (part, message)
    return message


# ------------------------------------------------------------------------------ caption_contrastive


def _contrastive(chain: Chain, data: str, tmp_path: Path) -> Callable[[], object]:
    cfg = CaptionContrastiveConfig(model=chain.encoder, max_steps=1, mntp_steps=0, nproc_per_node=1)
    return lambda: caption_contrastive.run(cfg, OFF, data=data, caption_encoder=str(tmp_path / "enc"))


def test_caption_contrastive_refuses_data_changed_after_prepare_data(chain, tmp_path):
    data = with_changed_shard(chain.data, tmp_path / "data")
    assert_refused(_contrastive(chain, data, tmp_path), "prepare_data", "sha256 differs")
    assert not (tmp_path / "enc" / "manifest.json").exists()


def test_caption_contrastive_refuses_another_stages_output_as_data(chain, tmp_path):
    assert_refused(_contrastive(chain, chain.embeddings, tmp_path), "prepare_data",
                   "is not a prepare_data v1 output", "'embed_captions'")


# ------------------------------------------------------------------------------ embed_captions


def _embed_run(data: str, encoder: str, out: Path) -> Callable[[], object]:
    return lambda: embed_captions.run(EMBED, OFF, data=data, caption_encoder=encoder, embeddings=str(out))


def test_embed_captions_refuses_an_encoder_without_its_settings(chain, tmp_path):
    encoder = tmp_path / "encoder"
    shutil.copytree(chain.encoder, encoder)
    (encoder / SETTINGS_FILE).unlink()  # embedding would silently fall back to default pooling/prompt
    assert_refused(_embed_run(chain.data, str(encoder), tmp_path / "emb"), "caption_contrastive",
                   f"has no {SETTINGS_FILE}")
    assert not (tmp_path / "emb" / "manifest.json").exists()


def test_embed_captions_refuses_settings_changed_after_caption_contrastive(chain, tmp_path):
    encoder = tmp_path / "encoder"
    shutil.copytree(chain.encoder, encoder)
    settings = json.loads((encoder / SETTINGS_FILE).read_text())
    (encoder / SETTINGS_FILE).write_text(json.dumps(settings | {"max_length": 64}))
    assert_refused(_embed_run(chain.data, str(encoder), tmp_path / "emb"), "caption_contrastive",
                   "differs from the settings", "max_length")


def test_embed_captions_refuses_another_stages_output_as_encoder(chain, tmp_path):
    assert_refused(_embed_run(chain.data, chain.vision_model, tmp_path / "emb"), "caption_contrastive",
                   "is a 'train_vision' output, not a caption encoder")


def test_embed_captions_refuses_data_changed_after_prepare_data(chain, tmp_path):
    data = with_changed_shard(chain.data, tmp_path / "data")
    assert_refused(_embed_run(data, chain.encoder, tmp_path / "emb"), "prepare_data", "sha256 differs")


# ------------------------------------------------------------------------------ train_vision


def _train(data: str, embeddings: str, out: Path) -> Callable[[], object]:
    return lambda: train_vision.run(VISION, OFF, data=data, embeddings=embeddings, vision_model=str(out))


def test_train_vision_refuses_embeddings_of_other_data(chain, tmp_path):
    assert_refused(_train(chain.other_data, chain.embeddings, tmp_path / "vision"), "embed_captions",
                   "embed", chain.other_data)
    assert not (tmp_path / "vision" / "manifest.json").exists()


def test_train_vision_refuses_embeddings_made_from_another_data_manifest(chain, tmp_path):
    """Same shards, another prepare_data manifest (another run/config): not what was embedded."""
    data = copy_with_manifest(chain.data, tmp_path / "data", config_hash="0" * 16)
    assert_refused(_train(data, chain.embeddings, tmp_path / "vision"), "embed_captions",
                   f"the embeddings in {chain.embeddings} were made from a data manifest with sha256", data)


def test_train_vision_refuses_another_stages_output_as_embeddings(chain, tmp_path):
    assert_refused(_train(chain.data, chain.data, tmp_path / "vision"), "embed_captions",
                   "is not an embed_captions v1 output")


def test_train_vision_records_the_lineage_evaluate_checks(chain):
    config = json.loads((Path(chain.vision_model) / "llm2clip_config.json").read_text())
    made = json.loads((Path(chain.embeddings) / "manifest.json").read_text())
    assert config["caption_encoder"]["fingerprint"] == made["encoder"]["fingerprint"] == encoder_fingerprint(
        chain.encoder)
    assert config["llm_embedding_dim"] == made["dim"] == 32
    assert made["data"]["manifest_sha256"] == json.loads(
        (Path(chain.vision_model) / "manifest.json").read_text())["inputs"]["data"]["manifest_sha256"]


# ------------------------------------------------------------------------------ evaluate (defect 1)


def _evaluate(chain: Chain, out: Path, *, data: str | None = None, embeddings: str | None = None,
              vision_model: str | None = None, **cfg) -> Callable[[], object]:
    config = EvaluateConfig(compare_champion=False, batch_size=16, **cfg)
    return lambda: evaluate.run(config, OFF, data=data or chain.data, embeddings=embeddings or chain.embeddings,
                                vision_model=vision_model or chain.vision_model, report=str(out))


def test_evaluate_records_the_caption_encoder_it_scored(chain):
    manifest = json.loads((Path(chain.report) / "manifest.json").read_text())
    assert manifest["caption_encoder"] == {"fingerprint": encoder_fingerprint(chain.encoder), "embedding_dim": 32}
    assert 0.0 <= manifest["primary"] <= 1.0


def test_evaluate_refuses_embeddings_of_another_caption_encoder(chain, tmp_path):
    """Defect 1: embeddings of another encoder were scored silently (a lower R@1, exit 0)."""
    made, trained = encoder_fingerprint(chain.other_encoder), encoder_fingerprint(chain.encoder)
    message = assert_refused(_evaluate(chain, tmp_path / "report", embeddings=chain.other_embeddings),
                             "embed_captions", made, trained)
    assert message == (
        f"embeddings in {chain.other_embeddings} were made with caption encoder {made}, but the model in "
        f"{chain.vision_model} was trained on embeddings of {trained}: re-run embed_captions with the caption "
        "encoder the model was trained with (`dvc repro embed_captions`; KFP: the embed_captions task), or "
        "evaluate the model trained on these embeddings (`dvc repro train_vision`)")
    assert not (tmp_path / "report" / "manifest.json").exists()


def test_evaluate_refuses_embeddings_of_another_width(chain, tmp_path):
    """Defect 1: embeddings of another width raised a raw ValueError from deep inside torch."""
    assert_refused(_evaluate(chain, tmp_path / "report", embeddings=chain.wide_embeddings), "embed_captions",
                   f"the embeddings in {chain.wide_embeddings} are 48-wide", "takes 32-wide caption embeddings")


def test_evaluate_refuses_sidecars_wider_than_their_manifest_says(chain, tmp_path):
    """A manifest edited to pass the checks still cannot feed the adapter vectors of another width."""
    made = json.loads((Path(chain.wide_embeddings) / "manifest.json").read_text())
    lying = copy_with_manifest(chain.wide_embeddings, tmp_path / "emb", dim=32,
                               encoder=made["encoder"] | {"fingerprint": encoder_fingerprint(chain.encoder)})
    assert_refused(_evaluate(chain, tmp_path / "report", embeddings=lying), "embed_captions",
                   "caption embeddings of shape", "48)", "takes 32-wide")


def test_evaluate_refuses_embeddings_of_other_data(chain, tmp_path):
    assert_refused(_evaluate(chain, tmp_path / "report", data=chain.other_data), "embed_captions",
                   chain.other_data)


def test_evaluate_refuses_an_eval_set_of_another_caption_encoder(chain, tmp_path):
    sets = (EvalSet(), EvalSet(name="other", data=chain.data, embeddings=chain.other_embeddings))
    assert_refused(_evaluate(chain, tmp_path / "report", eval_sets=sets), "embed_captions",
                   f"embeddings in {chain.other_embeddings} were made with caption encoder")


def test_evaluate_refuses_a_baseline_trained_on_another_caption_encoder(chain, tmp_path):
    baseline = _export_vision(chain.data, chain.other_embeddings, tmp_path / "baseline")
    assert_refused(_evaluate(chain, tmp_path / "report", baseline_model=baseline), "embed_captions",
                   f"the model in {baseline} was trained on embeddings of {encoder_fingerprint(chain.other_encoder)}")


def test_evaluate_refuses_a_directory_that_is_no_model(chain, tmp_path):
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "manifest.json").write_text(json.dumps({"stage": "train_vision"}))
    assert_refused(_evaluate(chain, tmp_path / "report", vision_model=str(vision)), "train_vision",
                   "not an exported LLM2CLIP model")


# ------------------------------------------------------------------------------ register


def _register(chain: Chain, tmp_path: Path, *, vision_model: str | None = None, caption_encoder: str | None = None,
              report: str | None = None) -> Callable[[], object]:
    common = CommonConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="lineage",
                          registered_model="lineage")
    return lambda: register.run(RegisterConfig(), common, vision_model=vision_model or chain.vision_model,
                                caption_encoder=caption_encoder or chain.encoder, report=report or chain.report,
                                registration=str(tmp_path / "registration"))


def test_register_refuses_a_report_of_another_model(chain, tmp_path):
    """The model changed after evaluate (here: its manifest), so the report's metrics are not its own."""
    vision = copy_with_manifest(chain.vision_model, tmp_path / "vision", steps=99)
    assert_refused(_register(chain, tmp_path, vision_model=vision), "evaluate",
                   f"the report in {chain.report} scored a model whose manifest sha256 is")
    assert not (tmp_path / "registration").exists()


def test_register_refuses_another_caption_encoder_than_the_model_was_trained_with(chain, tmp_path):
    assert_refused(_register(chain, tmp_path, caption_encoder=chain.other_encoder), "embed_captions",
                   f"caption_encoder {chain.other_encoder} is {encoder_fingerprint(chain.other_encoder)}",
                   f"the model in {chain.vision_model} was trained on embeddings of caption encoder "
                   f"{encoder_fingerprint(chain.encoder)}")


def test_register_refuses_another_stages_output_as_report(chain, tmp_path):
    assert_refused(_register(chain, tmp_path, report=chain.embeddings), "evaluate",
                   "is not an evaluate output", "'embed_captions'")


def test_register_accepts_the_matching_lineage(chain, tmp_path):
    result = _register(chain, tmp_path)()
    assert result.version == "1" and "challenger" in result.aliases


# ------------------------------------------------------------------------------ coverage


def test_every_stage_that_consumes_inputs_has_a_lineage_test():
    tested = {name.split("_refuses_")[0].removeprefix("test_") for name in globals() if "_refuses_" in name}
    consuming = {name for name, spec in STAGES.items() if spec.inputs}
    assert consuming <= tested, consuming - tested


def test_lineage_names_the_model_config_file_the_vision_package_writes():
    from llm2clip.lineage import MODEL_CONFIG_FILE
    from llm2clip.vision.model import CONFIG_FILE

    assert MODEL_CONFIG_FILE == CONFIG_FILE
