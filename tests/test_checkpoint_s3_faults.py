"""Object-store faults during checkpoint writes (issue #16): a checkpoint store on S3 (real moto,
real s3fs/botocore) behind the fault-injecting proxy of tests/s3_faults.py.

- 503 SlowDown, 500s and dropped connections while a checkpoint is uploaded, while ``latest`` is
  written and while a resume pulls it are retried (``llm2clip.io.S3_RETRIES``): the checkpoint
  that lands is byte-identical to one saved without faults, and a resume from it restores the same
  step, weights and optimizer state (a tiny real DeepSpeed engine; and train_vision, which ends on
  the weights of a run without faults);
- a store that keeps failing (every PUT of one checkpoint file, or of ``latest``; or a store that
  is gone mid-run) ends train_vision with one ERROR line (exit 2, no traceback); ``latest`` never
  names a checkpoint whose upload failed, the next run deletes the uncommitted files and resumes
  from the previous complete checkpoint (or starts fresh when there is none), and ends on the
  weights of an uninterrupted run;
- a pull that keeps failing leaves no staged ``latest``; a retention delete that keeps failing
  after the commit is a warning, not the end of the run.

The drills of a store that keeps failing lower botocore's tries with ``$AWS_MAX_ATTEMPTS=2`` (2
tries, s3fs's own retries on top): what is drilled is what happens once the retries are spent; with
the default (5 tries with backoff) one file gives up after about 18 s of 500s and 80-100 s of
dropped connections.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from checkpoint_drill import objects, same_state, state, tiny_engine, train_steps, vision_config, vision_inputs
from s3_faults import FaultProxy, Rule
from safetensors.torch import load

from llm2clip.cli import ErrorContext, explain_error, main
from llm2clip.config import CommonConfig, to_dict
from llm2clip.io import StageError
from llm2clip.stages import train_vision
from llm2clip.train import checkpoint
from llm2clip.train.checkpoint import CheckpointStore
from llm2clip.train.distributed import init_distributed

IDENTITY = {"run": "checkpoint-drill"}
CFG = vision_config()


@pytest.fixture()
def proxy(s3_server):
    p = FaultProxy(s3_server)
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    """S3 stores stage their checkpoints under this test's tmp dir (not the machine's $TMPDIR)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def ctx():
    """A process group of one (what a DeepSpeed engine needs); train_vision joins it too."""
    context = init_distributed()
    yield context
    context.shutdown()


# ------------------------------------------------------------ the store, with a tiny real engine


def test_faults_during_upload_commit_and_resume_are_ridden_out(ctx, proxy, s3_bucket):
    endpoint, bucket = s3_bucket
    engine = tiny_engine(seed=0)
    train_steps(engine, 2)
    saved = state(engine)
    clean = CheckpointStore.at(f"s3://{bucket}/clean", endpoint)
    faulty = CheckpointStore.at(f"s3://{bucket}/faulty", proxy.endpoint)
    for store in (clean, faulty):
        checkpoint.prepare_dir(store, IDENTITY, ctx)
    checkpoint.save(engine, clean, 2, {"step": 2}, ctx)
    proxy.rules = [Rule("drop", "PUT", r"model_states", times=1), Rule(503, "PUT", r"optim_states", times=1),
                   Rule(500, "PUT", r"/latest$", times=1)]
    checkpoint.save(engine, faulty, 2, {"step": 2}, ctx)
    assert proxy.fired() == 3  # every fault happened, and was ridden out
    landed = objects(endpoint, bucket, "faulty/")
    assert landed == objects(endpoint, bucket, "clean/")  # byte for byte
    assert landed["latest"] == b"step00000002" and len([k for k in landed if k.startswith("step")]) == 2

    proxy.rules = [Rule(503, "HEAD", times=1), Rule(500, "GET", r"list-type", times=1),
                   Rule(503, "GET", r"/latest$", times=1), Rule("drop", "GET", r"model_states", times=1),
                   Rule(500, "GET", r"optim_states", times=1)]
    for store in (clean, faulty):  # a new node (nothing staged), a fresh engine
        shutil.rmtree(store.local)
        fresh = tiny_engine(seed=1)
        assert not same_state(state(fresh), saved)
        checkpoint.prepare_dir(store, IDENTITY, ctx)
        client = checkpoint.load_latest(fresh, store.local)
        assert client["step"] == 2 and same_state(state(fresh), saved), store.remote
    assert proxy.fired() == 5


CASES = [  # what keeps failing; the step it fails; the files of that step that reach S3; the one before
    ("checkpoint-file-500", Rule(500, "PUT", r"step00000004/zero_pp_rank_0_mp_rank_00_optim_states"), 4,
     {"mp_rank_00_model_states.pt"}, 2),
    ("latest-pointer-dropped", Rule("drop", "PUT", r"/latest$"), 4,
     {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}, 2),
    ("first-checkpoint-503", Rule(503, "PUT", r"step00000002/mp_rank_00_model_states"), 2, set(), None),
]


@pytest.mark.parametrize(("rule", "failing", "landed", "previous"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_write_that_keeps_failing_is_never_committed(ctx, proxy, s3_bucket, monkeypatch, rule, failing, landed,
                                                       previous):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    rule = replace(rule)  # this case's own count
    store = CheckpointStore.at(f"s3://{bucket}/ckpt", proxy.endpoint)
    checkpoint.prepare_dir(store, IDENTITY, ctx)
    engine, states = tiny_engine(seed=0), {}
    with pytest.raises(StageError) as raised:
        for step in (2, 4):
            train_steps(engine, 2, seed=step)
            states[step] = state(engine)
            proxy.rules = [rule] if step == failing else []
            checkpoint.save(engine, store, step, {"step": step}, ctx)
    tag = f"step{failing:08d}"
    message = str(raised.value)
    assert message.startswith(f"checkpoint {tag} ") and "run the stage again" in message, message
    assert rule.fired >= 2  # botocore's tries (and s3fs's) before giving up
    left = objects(endpoint, bucket, "ckpt/")
    assert {k.removeprefix(f"{tag}/") for k in left if k.startswith(f"{tag}/")} == landed
    committed = f"step{previous:08d}" if previous else None
    assert left.get("latest") == (committed.encode() if committed else None)  # never the failed step
    assert checkpoint.latest_tag(store.local) == committed  # nor in the node's staging copy
    line, code = explain_error(raised.value, ErrorContext("train_vision"))  # what the command line says
    assert code == 2 and line.startswith(f"train_vision failed: checkpoint {tag} "), line

    restart = CheckpointStore.at(f"s3://{bucket}/ckpt", endpoint)  # the store answers again; a new node
    shutil.rmtree(restart.local)
    fresh = tiny_engine(seed=1)
    checkpoint.prepare_dir(restart, IDENTITY, ctx)
    assert not [k for k in objects(endpoint, bucket, "ckpt/") if k.startswith(tag)]  # the uncommitted save is gone
    client = checkpoint.load_latest(fresh, restart.local)
    if previous is None:
        assert client is None  # starts fresh
    else:
        assert client["step"] == previous and same_state(state(fresh), states[previous])


def test_a_resume_whose_pull_keeps_failing_stages_nothing_that_looks_complete(ctx, proxy, s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    store = CheckpointStore.at(f"s3://{bucket}/ckpt", endpoint)
    checkpoint.prepare_dir(store, IDENTITY, ctx)
    engine = tiny_engine(seed=0)
    train_steps(engine, 2)
    checkpoint.save(engine, store, 2, {"step": 2}, ctx)
    committed = objects(endpoint, bucket, "ckpt/")

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    proxy.rules = [Rule(500, "GET", r"step00000002/zero_pp_rank_0_mp_rank_00_optim_states")]
    restart = CheckpointStore.at(f"s3://{bucket}/ckpt", proxy.endpoint)  # a new node, the store failing
    shutil.rmtree(restart.local)
    with pytest.raises(StageError, match="could not read the checkpoint store .* run the stage again"):
        checkpoint.prepare_dir(restart, IDENTITY, ctx)
    assert (restart.local / "step00000002" / "mp_rank_00_model_states.pt").is_file()  # half of it was pulled
    assert checkpoint.latest_tag(restart.local) is None  # but nothing says it is complete
    assert objects(endpoint, bucket, "ckpt/") == committed  # and the store is as it was


def test_old_checkpoints_that_cannot_be_deleted_are_a_warning(ctx, proxy, s3_bucket, monkeypatch, caplog):
    """Retention runs after the commit: a failed delete must not end a run whose checkpoint landed."""
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = CheckpointStore.at(f"s3://{bucket}/ckpt", proxy.endpoint)
    checkpoint.prepare_dir(store, IDENTITY, ctx)
    engine = tiny_engine(seed=0)

    def steps() -> list[str]:
        return sorted({k.split("/")[0] for k in objects(endpoint, bucket, "ckpt/") if k.startswith("step")})

    for step in (2, 4, 6, 8):
        proxy.rules = [Rule(500, "POST", r"\?delete")] if step == 6 else []  # S3 DeleteObjects
        train_steps(engine, 1, seed=step)
        checkpoint.save(engine, store, step, {"step": step}, ctx, keep=2)
        if step == 6:
            assert steps() == ["step00000002", "step00000004", "step00000006"] and proxy.fired() >= 1
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("step00000006 is committed, but older ones" in m for m in warned), warned
    assert steps() == ["step00000006", "step00000008"]  # the next save removed them
    assert objects(endpoint, bucket, "ckpt/")["latest"] == b"step00000008"


# ------------------------------------------------------- train_vision through the command line


@pytest.fixture(scope="module")
def vision(ctx, tmp_path_factory) -> tuple[str, str, Path]:
    """``(data, embeddings, output of an uninterrupted run)``, all local."""
    root = tmp_path_factory.mktemp("vision")
    data, emb = vision_inputs(root)
    train_vision.run(CFG, CommonConfig(tracking=False), data=data, embeddings=emb, vision_model=str(root / "ref"))
    return data, emb, root / "ref"


def train_vision_cli(vision, endpoint: str, out: str) -> int:
    common = to_dict(CommonConfig(tracking=False, s3_endpoint_url=endpoint))
    return main(["train_vision", "--common-json", json.dumps(common), "--config-json", json.dumps(to_dict(CFG)),
                 "--data", vision[0], "--embeddings", vision[1], "--vision-model", out])


def tensors(blob: bytes) -> dict[str, torch.Tensor]:
    """The weights and AdamW state in a train_vision checkpoint (DeepSpeed's model-states file)."""
    saved = torch.load(io.BytesIO(blob), weights_only=False)  # our own test's file
    out = {f"module.{k}": v for k, v in saved["module"].items()}
    for i, s in saved["optimizer"]["state"].items():
        out |= {f"adam.{i}.{k}": torch.as_tensor(v) for k, v in s.items()}
    return out


def assert_like_the_uninterrupted_run(vision, endpoint: str, bucket: str, resumed_from: int) -> None:
    left = objects(endpoint, bucket, "vision/")
    manifest = json.loads(left["manifest.json"])
    assert manifest["training"]["resumed_from"] == resumed_from and manifest["training"]["steps"] == CFG.max_steps
    got, ref = load(left["model.safetensors"]), load((vision[2] / "model.safetensors").read_bytes())
    assert got.keys() == ref.keys() and max(float((got[k] - ref[k]).abs().max()) for k in got) <= 1e-6


def test_train_vision_rides_out_faults_on_its_checkpoints(vision, proxy, s3_bucket):
    endpoint, bucket = s3_bucket
    proxy.rules = [Rule(503, "PUT", r"checkpoints/run\.json", times=1),
                   Rule(503, "PUT", r"checkpoints/step00000002/", times=1),
                   Rule("drop", "PUT", r"checkpoints/step00000004/", times=1),
                   Rule(500, "PUT", r"checkpoints/latest$", times=1)]
    assert train_vision_cli(vision, proxy.endpoint, f"s3://{bucket}/vision") == 0
    assert proxy.fired() == 4
    left = objects(endpoint, bucket, "vision/")
    assert left["checkpoints/latest"] == b"step00000004"
    for tag in ("step00000002", "step00000004"):  # what landed is what the fault-free run saved
        name = f"checkpoints/{tag}/mp_rank_00_model_states.pt"
        got, ref = tensors(left[name]), tensors((vision[2] / name).read_bytes())
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got), tag
    assert_like_the_uninterrupted_run(vision, endpoint, bucket, resumed_from=0)


class AfterFirstCheckpoint(logging.Handler):
    """Runs ``outage`` once, in the training process, right after the first checkpoint is committed."""

    def __init__(self, outage) -> None:
        super().__init__(logging.INFO)
        self.outage, self.done = outage, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.done and record.getMessage().endswith(" saved"):
            self.done = True
            self.outage()


def _store_gone(proxy: FaultProxy) -> None:
    proxy.rules = [Rule("drop")]  # open connections are dropped
    proxy.stop()  # new ones refused


OUTAGES = {  # after the first checkpoint (step 2) is committed: what fails; the one line says
    "checkpoint-files-500": (lambda p: p.rules.append(Rule(500, "PUT", r"checkpoints/step")),
                             "checkpoint step00000004 could not be uploaded"),
    "latest-pointer-500": (lambda p: p.rules.append(Rule(500, "PUT", r"checkpoints/latest$")),
                           "checkpoint step00000004 is uploaded, but"),
    "store-gone": (_store_gone, "checkpoint step00000004 could not be uploaded"),
}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_train_vision_on_a_store_that_keeps_failing_is_one_error_line_then_resumes(
        vision, proxy, s3_server, s3_bucket, monkeypatch, caplog, outage):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    fail, says = OUTAGES[outage]
    caplog.set_level(logging.INFO, logger=checkpoint.__name__)
    hook = AfterFirstCheckpoint(lambda: fail(proxy))
    logging.getLogger(checkpoint.__name__).addHandler(hook)
    try:
        assert train_vision_cli(vision, proxy.endpoint, f"s3://{bucket}/vision") == 2
    finally:
        logging.getLogger(checkpoint.__name__).removeHandler(hook)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert hook.done and len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert says in errors[0].getMessage(), errors[0].getMessage()
    left = objects(endpoint, bucket, "vision/")
    assert left["checkpoints/latest"] == b"step00000002"  # the previous complete checkpoint
    assert "manifest.json" not in left and "model.safetensors" not in left

    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    back = FaultProxy(s3_server)  # the store answers again; the resume's pull sees a fault of its own
    back.rules = [Rule(500, "GET", r"checkpoints/step00000002/mp_rank_00_model_states", times=1)]
    try:
        assert train_vision_cli(vision, back.endpoint, f"s3://{bucket}/vision") == 0
    finally:
        back.stop()
    assert back.fired() == 1
    assert_like_the_uninterrupted_run(vision, endpoint, bucket, resumed_from=2)
