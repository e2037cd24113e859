"""SigLipLoss == open_clip's SigLipLoss (value and gradients, 1, 2 and 6 gloo ranks); the dict
contract of the loss objects; the open_clip reference is read from its wheel, never imported.

open_clip cannot be installed next to our torch (it pulls torchvision), so ``make install``
downloads its wheel to ``.cache/reference`` and :func:`load_open_clip_loss` extracts the single
file ``open_clip/loss.py`` and loads it by path (it imports only torch).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from gloo import run_ranks

from llm2clip.losses import LOSSES, ClipLoss, SigLipLoss

REPO = Path(__file__).resolve().parents[2]
REFERENCE_WHEEL = REPO / ".cache" / "reference" / "open_clip_torch-3.3.0-py3-none-any.whl"
KEYS = {"loss", "logits_per_image", "logits_per_text", "labels"}
# Our losses compute in fp32; the reference gets the same float64 inputs and computes in float64.
TOL = {"atol": 1e-6, "rtol": 1e-5}


def load_module_file(path: Path | str) -> ModuleType:
    """Import the Python file at ``path`` as a fresh module (not via ``sys.path``)."""
    path = Path(path)
    name = f"_reference_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def extract_open_clip_loss(folder: Path) -> Path:
    """Write ``open_clip/loss.py`` of the reference wheel to ``folder``; fail (not skip) without it."""
    if not REFERENCE_WHEEL.is_file():
        pytest.fail(f"the open_clip reference wheel {REFERENCE_WHEEL} is missing: run "
                    "`make install` (with an up-to-date .venv: `.venv/bin/pip download --no-deps "
                    "open_clip_torch==3.3.0 -d .cache/reference`)", pytrace=False)
    path = Path(folder) / "open_clip_loss.py"
    with zipfile.ZipFile(REFERENCE_WHEEL) as wheel:
        path.write_bytes(wheel.read("open_clip/loss.py"))
    return path


def load_open_clip_loss(folder: Path) -> ModuleType:
    """open_clip's ``loss`` module (``ClipLoss``, ``SigLipLoss``), from the wheel by file path."""
    return load_module_file(extract_open_clip_loss(folder))


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> Path:
    return extract_open_clip_loss(tmp_path_factory.mktemp("open_clip"))


def features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float64 image and text features; texts correlate with their images."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64)
    text = image + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def siglip_both(image, text, scale, bias, reference, rank=0, world=1) -> dict:
    """Our SigLipLoss and open_clip's on the same float64 leaves: losses and the 4 gradients."""
    out = {}
    for tag, fn in (("ours", SigLipLoss()), ("ref", reference.SigLipLoss(rank=rank, world_size=world))):
        inputs = leaves(image, text, scale, bias)
        result = fn(*inputs)
        loss = result["loss"] if isinstance(result, dict) else result
        loss.backward()
        out[tag] = {"loss": loss.detach(), "grads": [t.grad for t in inputs]}
    return out


def max_diff(ours: dict, ref: dict) -> float:
    """Largest absolute difference over the loss and every gradient (reported by the tests)."""
    diffs = [float((ours["loss"].double() - ref["loss"].double()).abs())]
    diffs += [float((a.double() - b.double()).abs().max()) for a, b in zip(ours["grads"], ref["grads"], strict=True)]
    return max(diffs)


def assert_same(ours: dict, ref: dict) -> None:
    torch.testing.assert_close(ours["loss"].double(), ref["loss"].double(), **TOL)
    for name, a, b in zip(("image", "text", "logit_scale", "logit_bias"), ours["grads"], ref["grads"], strict=True):
        torch.testing.assert_close(a.double().reshape(b.shape), b.double(), **TOL, msg=lambda m, n=name: f"{n}: {m}")


SCALE_BIAS = [(10.0, -10.0), (1.0, 0.0), (25.0, -3.5)]


@pytest.mark.parametrize(("scale", "bias"), SCALE_BIAS)
def test_siglip_matches_open_clip_single_process(scale, bias, reference_file):
    image, text = features(6)
    got = siglip_both(image, text, torch.tensor([scale], dtype=torch.float64),
                      torch.tensor([bias], dtype=torch.float64), load_module_file(reference_file))
    print(f"siglip world 1 scale {scale} bias {bias}: max |ours - open_clip| = {max_diff(got['ours'], got['ref']):.2e}")
    assert got["ours"]["loss"].dtype == torch.float32
    assert_same(got["ours"], got["ref"])


def test_siglip_matches_explicit_loops():
    """-sum over pairs of log sigmoid(z * (s <i, t> + b)) / B, with z = +1 on the diagonal only."""
    image, text = features(5)
    s, b = 7.0, -2.0
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * (s * float(image[i] @ text[j]) + b)))
    got = SigLipLoss()(image, text, torch.tensor(s), torch.tensor(b))["loss"]
    assert got.item() == pytest.approx(total / 5, rel=1e-6)


def _siglip_rank(rank, world, n, scale, bias, reference_file):
    image, text = features(n * world)
    rows = slice(rank * n, (rank + 1) * n)
    got = siglip_both(image[rows], text[rows], torch.tensor([scale], dtype=torch.float64),
                      torch.tensor([bias], dtype=torch.float64), load_module_file(reference_file),
                      rank=rank, world=world)
    out = SigLipLoss()(image[rows], text[rows], torch.tensor(scale), torch.tensor(bias))
    got["shapes"] = {k: tuple(v.shape) for k, v in out.items()}
    got["labels"] = out["labels"]
    return got


@pytest.mark.parametrize("world", [2, 6])
def test_siglip_matches_open_clip_across_ranks(world, tmp_path, reference_file):
    """Real gloo ranks (6 = two bidirectional rounds, then the one-way step to the opposite rank):
    every rank's loss and gradients equal open_clip's, and the mean over ranks is the
    single-process loss of the global batch (gradients: summed over ranks by the exchange)."""
    n, scale, bias = 3, 10.0, -10.0
    ranks = run_ranks(_siglip_rank, tmp_path, n, scale, bias, str(reference_file), world=world)
    worst = max(max_diff(r["ours"], r["ref"]) for r in ranks)
    print(f"siglip world {world}: max |ours - open_clip| over ranks = {worst:.2e}")
    for r in ranks:
        assert_same(r["ours"], r["ref"])
        assert r["shapes"] == {"loss": (), "logits_per_image": (n, n), "logits_per_text": (n, n), "labels": (n,)}
        assert r["labels"].tolist() == list(range(n))

    image, text = features(n * world)
    inputs = leaves(image, text, torch.tensor([scale], dtype=torch.float64), torch.tensor([bias], dtype=torch.float64))
    full = SigLipLoss()(*inputs)["loss"]
    full.backward()
    mean = sum(r["ours"]["loss"] for r in ranks) / world
    torch.testing.assert_close(mean, full.detach(), **TOL)
    for rank, r in enumerate(ranks):
        rows = slice(rank * n, (rank + 1) * n)
        for got, ref in zip(r["ours"]["grads"][:2], inputs[:2], strict=True):
            torch.testing.assert_close(got / world, ref.grad[rows], **TOL)
    for i in (2, 3):  # replicated scalars: DeepSpeed averages their gradients over ranks
        torch.testing.assert_close(sum(r["ours"]["grads"][i] for r in ranks) / world, inputs[i].grad, **TOL)


def _ragged_rank(rank, world, sizes):
    image, text = features(sum(sizes))
    start = sum(sizes[:rank])
    local = leaves(image[start : start + sizes[rank]], text[start : start + sizes[rank]])
    loss = SigLipLoss()(*local, torch.tensor(5.0), torch.tensor(-1.0))["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": [t.grad for t in local]}


def test_siglip_ragged_batches_across_three_ranks(tmp_path):
    """Local batches of different sizes (open_clip needs equal ones): the per-rank losses, each a
    sum over this rank's pairs / its own B, add up to the global sum of pair losses."""
    sizes = (2, 4, 3)
    ranks = run_ranks(_ragged_rank, tmp_path, sizes, world=3)
    image, text = leaves(*features(sum(sizes)))
    full = SigLipLoss()(image, text, torch.tensor(5.0), torch.tensor(-1.0))["loss"]
    (full * sum(sizes)).backward()  # the global sum of pair losses
    weighted = sum(size * r["loss"] for size, r in zip(sizes, ranks, strict=True))
    torch.testing.assert_close(weighted, full.detach() * sum(sizes), **TOL)
    # the gradient of sum_r B_r * loss_r w.r.t. rank r's rows: images only see their own rank's
    # loss (scale B_r); texts are scored by every rank, so only the image gradient scales simply
    for rank, (size, r) in enumerate(zip(sizes, ranks, strict=True)):
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        torch.testing.assert_close(size * r["grads"][0], image.grad[rows], **TOL)


# ---------------------------------------------------------------------------------------------
# The dict contract and the class attributes


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_output_dict_contract(cls, dtype):
    n = 5
    image, text = (t.to(dtype) for t in features(n))
    out = cls()(image, text, torch.tensor([10.0]), torch.tensor([-1.0]) if cls.needs_bias else None)
    assert set(out) == KEYS
    assert out["loss"].shape == () and out["loss"].dtype == torch.float32
    assert out["logits_per_image"].shape == out["logits_per_text"].shape == (n, n)
    assert out["labels"].tolist() == list(range(n)) and out["labels"].dtype == torch.long
    torch.testing.assert_close(out["logits_per_text"], out["logits_per_image"].T)
    # in-batch accuracy, computed the same way for every loss; orthogonal pairs: every match wins
    aligned = torch.eye(n, 8, dtype=dtype)
    perfect = cls()(aligned, aligned, torch.tensor(50.0), torch.tensor(-5.0) if cls.needs_bias else None)
    assert (perfect["logits_per_image"].argmax(1) == perfect["labels"]).all()
    assert perfect["loss"] < out["loss"]


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
def test_bad_inputs_are_errors(cls):
    image, text = features(4)
    with pytest.raises(ValueError, match="same shape"):
        cls()(image, text[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_scale"):
        cls()(image, text, torch.ones(2))


def test_class_attributes_tell_the_model_what_to_build():
    assert SigLipLoss.needs_bias and not ClipLoss.needs_bias
    assert SigLipLoss.init_logit_scale == pytest.approx(math.log(10)) and SigLipLoss.init_logit_bias == -10.0
    assert ClipLoss.init_logit_scale == pytest.approx(math.log(1 / 0.07)) and ClipLoss.init_logit_bias is None
    assert {name: cls.name for name, cls in LOSSES.items()} == {"clip": "clip", "siglip": "siglip"}


def test_siglip_without_a_bias_is_a_zero_bias():
    image, text = features(4)
    scale = torch.tensor(3.0)
    torch.testing.assert_close(SigLipLoss()(image, text, scale)["loss"],
                               SigLipLoss()(image, text, scale, torch.tensor(0.0))["loss"])


def test_missing_wheel_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REFERENCE_WHEEL", tmp_path / "absent.whl")
    with pytest.raises(pytest.fail.Exception, match="make install"):
        extract_open_clip_loss(tmp_path)
