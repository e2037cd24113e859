"""KFP caching is correct: a task's key moves with its data, its section, the code and the image,
and with nothing else (not the run id, not the cluster profile's pod settings).

Keys are computed by pipelines.cache_key, a model of the KFP backend's ``GenerateCacheKey`` (its
fields are listed there) over the real compiled pipeline; no KFP backend runs here.
"""

import shutil

import pytest
import yaml
from kfp import dsl
from kfp_helpers import REPO

from components import image_tag, source_digest
from llm2clip.cluster.profile import load_cluster_profile
from llm2clip.config import load_params
from llm2clip.stages import STAGES
from pipelines.cache_key import task_cache_keys
from pipelines.compile import compile_pipeline
from pipelines.llm2clip_pipeline import pipeline_arguments

EVAL_SETS = len(load_params(REPO / "params.yaml").eval_data)
PREPARE_EVAL = {f"prepare_eval[{i}]" for i in range(EVAL_SETS)}  # the eval-set ParallelFor's tasks, per item
EMBED_EVAL = {f"embed_eval[{i}]" for i in range(EVAL_SETS)}
EVERY_TASK = set(STAGES) | PREPARE_EVAL | EMBED_EVAL
DOWNSTREAM = {  # a stage and every stage that consumes its outputs, directly or not
    # the eval sets are prepared from their own sections (the pipeline's data does not touch them)
    # and embedded with the caption encoder, which the data trains
    "prepare_data": set(STAGES) | EMBED_EVAL,
    "caption_contrastive": {"caption_contrastive", "embed_captions", "train_vision", "evaluate", "register"}
    | EMBED_EVAL,
    "embed_captions": {"embed_captions", "train_vision", "evaluate", "register"},
    "train_vision": {"train_vision", "evaluate", "register"},
    "evaluate": {"evaluate", "register"},
    "register": {"register"},
}


def fanned(tasks: set[str], profile: str) -> set[str]:
    """``tasks`` plus the group tasks of every stage in it that the profile fans out (the group
    tasks take the stage's section and inputs: they rerun whenever their merge does)."""
    cluster = load_cluster_profile(profile)
    return tasks | {f"{stage}_group[{i}]" for stage in tasks if stage in STAGES
                    for i in range(cluster.task(stage).shard_groups) if cluster.task(stage).shard_groups > 1}


def compile_spec(tmp_path, profile) -> dict:
    path = compile_pipeline(tmp_path / f"{getattr(profile, 'stem', profile)}.yaml", profile)
    return next(yaml.safe_load_all(path.read_text()))


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {stage for stage in a if a[stage] != b[stage]}


@pytest.fixture(scope="module")
def arguments():
    return pipeline_arguments(load_params(REPO / "params.yaml"))


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_section_change_reruns_the_stage_and_what_reads_its_outputs(compiled, arguments, profile, stage):
    spec = compiled[profile][0]
    base = task_cache_keys(spec, arguments)
    edited = {**arguments, stage: {**arguments[stage], "seed_offset_probe": 1}}
    assert changed(base, task_cache_keys(spec, edited)) == fanned(DOWNSTREAM[stage], profile)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_new_data_always_reruns_the_training_launchers(compiled, arguments, profile):
    """Under the gpu profile train_vision's task only launches a TrainJob; it still takes the data
    artifacts as inputs, so new data is a new key and the launcher is never skipped."""
    spec = compiled[profile][0]
    edited = {**arguments, "prepare_data": {**arguments["prepare_data"], "val_fraction": 0.2}}
    assert {"caption_contrastive", "train_vision"} <= changed(task_cache_keys(spec, arguments),
                                                              task_cache_keys(spec, edited))


def test_common_changes_every_stage(compiled, arguments):
    from pipelines.llm2clip_pipeline import eval_data_items

    spec = compiled["cpu"][0]
    params = load_params(REPO / "params.yaml", ["common.seed=123"])
    edited = {**arguments, "common": {**arguments["common"], "seed": 123}, "eval_data": eval_data_items(params)}
    assert changed(task_cache_keys(spec, arguments), task_cache_keys(spec, edited)) == EVERY_TASK


def test_the_eval_sets_are_cached_apart_from_the_model_and_from_each_other(compiled, arguments):
    """A new model re-scores the eval sets without preparing or embedding them again; editing one
    set reruns that set's two tasks, evaluate and register only."""
    spec = compiled["cpu"][0]
    base = task_cache_keys(spec, arguments)
    assert EVAL_SETS >= 2 and PREPARE_EVAL | EMBED_EVAL <= set(base)
    model = {**arguments, "train_vision": {**arguments["train_vision"], "lr": 1e-3}}
    assert changed(base, task_cache_keys(spec, model)) == DOWNSTREAM["train_vision"]
    items = [dict(item) for item in arguments["eval_data"]]
    items[1] = {**items[1], "prepare_data": {**items[1]["prepare_data"], "image_max_side": 96}}
    assert changed(base, task_cache_keys(spec, {**arguments, "eval_data": items})) == {
        "prepare_eval[1]", "embed_eval[1]", "evaluate", "register"}
    # the embedding settings re-embed every eval set, as they re-embed the pipeline's captions
    embed = {**arguments, "embed_captions": {**arguments["embed_captions"], "dtype": "float32"}}
    from pipelines.llm2clip_pipeline import eval_data_items

    params = load_params(REPO / "params.yaml", ["embed_captions.dtype=float32"])
    assert changed(base, task_cache_keys(spec, {**embed, "eval_data": eval_data_items(params)})) == (
        DOWNSTREAM["embed_captions"] | EMBED_EVAL)


def test_image_changes_rerun_the_tasks_that_use_them(compiled, arguments):
    cpu = compiled["cpu"][0]
    assert changed(task_cache_keys(cpu, arguments),
                   task_cache_keys(cpu, {**arguments, "image": "registry/llm2clip:other-cpu"})) == EVERY_TASK
    gpu = compiled["gpu"][0]
    base = task_cache_keys(gpu, arguments)
    # GPU tasks run gpu_image; the TrainJob launchers pass it to their nodes (trainjob_image)
    # (embed_captions' merge pod is a CPU one; its parts come from GPU group tasks)
    assert changed(base, task_cache_keys(gpu, {**arguments, "gpu_image": "registry/llm2clip:x-cu128"})) == (
        fanned(DOWNSTREAM["caption_contrastive"], "gpu"))


def test_a_code_change_is_a_new_default_image(tmp_path):
    for name in ("pyproject.toml", "Dockerfile"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "llm2clip", tmp_path / "llm2clip", ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(tmp_path) == source_digest(REPO)
    (tmp_path / "README.md").write_text("docs only")  # not in the image's code: no new tag
    assert source_digest(tmp_path) == source_digest(REPO)
    config = tmp_path / "llm2clip" / "config" / "common.py"
    config.write_text(config.read_text().replace("seed: int = 0", "seed: int = 1"))
    assert source_digest(tmp_path) != source_digest(REPO)
    assert image_tag("cpu", root=tmp_path) != image_tag("cpu") and image_tag("cpu").endswith("-cpu")
    assert image_tag("gpu").endswith("-cu128")


def test_default_images_name_this_source_tree(compiled):
    spec = compiled["cpu"][0]
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["image"]["defaultValue"] == image_tag("cpu")
    assert defaults["gpu_image"]["defaultValue"] == image_tag("gpu")


def test_the_run_id_is_no_task_input(compiled):
    """It was a parameter: every run had new keys, so nothing was ever reused across runs."""
    for profile in ("cpu", "gpu"):
        spec, _ = compiled[profile]
        text = yaml.safe_dump(spec)
        assert dsl.PIPELINE_JOB_ID_PLACEHOLDER not in text and "pipeline_run_id" not in text


def test_pod_settings_move_no_key(tmp_path, compiled, arguments):
    """Resources, GPUs of a local task, secrets, tolerations, retries, timeouts, /dev/shm: none enters the key."""
    raw = yaml.safe_load((REPO / "params" / "cluster" / "cpu.yaml").read_text())
    raw["defaults"].update(cpu_request="7", memory_limit="64Gi", retries=5, timeout_s=99, shm_size="8Gi",
                           tolerations=[{"key": "x", "operator": "Exists"}], node_selector={"pool": "big"})
    raw["secrets"].append({"secret": "extra", "env": {"EXTRA": "EXTRA"}})
    raw["stages"]["evaluate"] = {"memory_request": "1Gi"}
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(raw))
    load_cluster_profile(edited)  # valid
    assert task_cache_keys(compile_spec(tmp_path, edited), arguments) == task_cache_keys(compiled["cpu"][0], arguments)


def test_num_nodes_is_in_the_key(tmp_path, compiled, arguments):
    """The TrainJob's node count sets the world size (the global batch): it reruns training."""
    raw = yaml.safe_load((REPO / "params" / "cluster" / "gpu.yaml").read_text())
    raw["stages"]["train_vision"]["num_nodes"] = 4
    edited = tmp_path / "gpu4.yaml"
    edited.write_text(yaml.safe_dump(raw))
    assert changed(task_cache_keys(compiled["gpu"][0], arguments),
                   task_cache_keys(compile_spec(tmp_path, edited), arguments)) == DOWNSTREAM["train_vision"]
