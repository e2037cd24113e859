"""``train_vision.accumulation: cached_features`` (open_clip ``--accum-freq``): k micro-batches
train like ONE batch of k times the size -- loss, gradients, and whole runs -- at 1 and 2 gloo
ranks, while the autograd graph held at any time is one micro-batch's.

Everything runs through the real DeepSpeed engine (:func:`llm2clip.train.engine.build_engine`)
inside spawned ranks (``gloo.run_ranks``). Gradients are read by a thin engine wrapper at the
accumulation boundary, after the last backward and before the optimizer step, with DeepSpeed's
``safe_get_full_grad`` (the all-reduced gradient, under every ZeRO stage): that is the gradient the
optimizer steps with, so the 1/gradient_accumulation_steps scaling DeepSpeed may apply in
``engine.backward`` is inside what is compared.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from gloo import run_ranks

from llm2clip.config import ConfigError, TrainVisionConfig, load_params

K, B = 3, 4  # micro-batches per optimizer step, samples per micro-batch and rank
TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "patch_size": 8}
CPU = torch.device("cpu")
TOL = 1e-5
STEPS = 3  # optimizer steps of the end-to-end runs


def test_config_rejects_an_unknown_accumulation():
    assert TrainVisionConfig().accumulation == "sum"  # existing configs keep DeepSpeed's summation
    with pytest.raises(ConfigError, match=r"^train_vision.accumulation: must be 'sum' or 'cached_features'"):
        TrainVisionConfig(accumulation="mean")
    with pytest.raises(ConfigError, match="train_vision.accumulation"):
        load_params(None, ["train_vision.accumulation=cached"])
    assert load_params(None, ["train_vision.accumulation=cached_features"]).train_vision.accumulation == (
        "cached_features")


# ------------------------------------------------------------------------------ rank-side helpers


def _model(loss: str = "clip", tower: dict | None = None):
    from llm2clip.losses import LOSSES
    from llm2clip.vision.model import LLM2CLIPModel

    torch.manual_seed(0)
    cls = LOSSES[loss]
    return LLM2CLIPModel.build(tower or {"kind": "vit_scratch", "config": TINY_VIT, "image_size": 32}, llm_dim=8,
                               embed_dim=16, adapter_blocks=1, loss=loss, logit_scale_init=2.0,
                               logit_bias_init=cls.init_logit_bias if cls.needs_bias else None)


def _data(rank: int, index: int, rows: int) -> dict[str, torch.Tensor]:
    """``rows`` samples of rank ``rank``, the ``index``-th draw (a pure function of both)."""
    g = torch.Generator().manual_seed(1000 * rank + index)
    return {"pixels": torch.randn(rows, 3, 32, 32, generator=g), "text": torch.randn(rows, 8, generator=g)}


def _split(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[j * B:(j + 1) * B] for k, v in batch.items()} for j in range(K)]


def _engine(model, world: int, zero: int, accumulation: int, batch: int):
    from llm2clip.train import engine as ds_engine

    cfg = TrainVisionConfig(batch_size=batch, zero_stage=zero, gradient_clipping=0.0, lr=1e-3)
    return ds_engine.build_engine(model, model.param_groups(cfg.lr, 0.0), cfg, world_size=world, precision="fp32",
                                  total_steps=1, schedule="constant", accumulation=accumulation)


class Probe:
    """The engine as the trainer sees it (call, ``backward``, ``step``), recording on the way:
    the full gradient of every parameter at the accumulation boundary (before the optimizer step
    uses it) and, when ``saved`` is given, the autograd-saved tensors of every model forward."""

    def __init__(self, engine, saved: SavedTensors | None = None) -> None:
        self.engine, self.module, self.saved = engine, engine.module, saved
        self.grads: dict[str, torch.Tensor] = {}
        self.live_at_forward: list[int] = []  # saved bytes still alive when a forward starts

    def __call__(self, pixels, text):
        if self.saved is None:
            return self.engine(pixels, text)
        self.live_at_forward.append(self.saved.live)
        with torch.autograd.graph.saved_tensors_hooks(self.saved.pack, self.saved.unpack):
            return self.engine(pixels, text)

    def backward(self, loss, **kwargs):
        return self.engine.backward(loss, **kwargs)

    def step(self) -> None:
        from deepspeed.utils import safe_get_full_grad

        if self.engine.is_gradient_accumulation_boundary():
            self.grads = {n: safe_get_full_grad(p).detach().clone() for n, p in self.module.named_parameters()}
        self.engine.step()


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensors:
    """Bytes of the tensors autograd keeps for backward, alive now and at most.

    ``pack`` runs when an op saves a tensor for backward; the packed holder lives exactly as long
    as the graph node that keeps it (backward frees it), so ``live`` is the size of the graph
    held at this moment and ``peak`` its maximum. Only tensors saved while the hooks are active
    are counted (the model forwards in :class:`Probe`, not the loss).
    """

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor) -> _Held:
        # detached: holding the tensor itself would make a saved *output* (exp saves its result)
        # keep its own graph node alive through this holder, a cycle gc cannot see
        held, size = _Held(tensor.detach()), tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(held, self._free, size)
        return held

    def unpack(self, held: _Held) -> torch.Tensor:
        return held.tensor

    def _free(self, size: int) -> None:
        self.live -= size


def _one_step(model, mode: str, batch: dict[str, torch.Tensor], world: int, zero: int,
              saved: SavedTensors | None = None, seeds=(7, 8, 9)) -> tuple[torch.Tensor, dict, Probe]:
    """One optimizer step of ``model`` (a fresh copy) on this rank's ``K x B`` rows ``batch``:
    ``big`` (one micro-batch of ``K x B``), ``cached`` (K micro-batches, cached_features) or
    ``sum`` (K micro-batches, DeepSpeed summation). Returns the stats, the gradients, the probe."""
    from llm2clip.losses import create_loss
    from llm2clip.train.vision_trainer import _micro_step, cached_features_step

    model = copy.deepcopy(model)
    probe = Probe(_engine(model, world, zero, 1 if mode == "big" else K, K * B if mode == "big" else B), saved)
    loss_fn = create_loss(model.loss)
    if mode == "cached":
        stats = cached_features_step(probe, loss_fn, _split(batch), list(seeds), torch.float32, CPU)
    elif mode == "big":
        torch.manual_seed(seeds[0])
        stats = _micro_step(probe, loss_fn, batch, torch.float32, CPU)
    else:
        stats = []
        for micro, seed in zip(_split(batch), seeds, strict=True):
            torch.manual_seed(seed)
            stats.append(_micro_step(probe, loss_fn, micro, torch.float32, CPU))
        stats = torch.stack(stats).mean(dim=0)
    return stats, probe.grads, probe


def _gradients(rank: int, world: int, zero_stages: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """``{"<loss>/zero<N>/<mode>/stats" | .../grad/<param>: tensor}`` for big, cached and sum."""
    out = {}
    batch = _data(rank, 0, K * B)
    for loss in ("clip", "siglip"):
        model = _model(loss)
        for zero in zero_stages:
            for mode in ("big", "cached", "sum"):
                stats, grads, _ = _one_step(model, mode, batch, world, zero)
                out[f"{loss}/zero{zero}/{mode}/stats"] = stats
                out |= {f"{loss}/zero{zero}/{mode}/grad/{n}": g for n, g in grads.items()}
    return out


def _runs(rank: int, world: int) -> dict[str, torch.Tensor]:
    """``vision_trainer.train`` for STEPS steps: cached (K x B), one big batch (1 x KB), sum (K x B)."""
    from llm2clip.train.distributed import DistContext
    from llm2clip.train.vision_trainer import TrainPlan, train

    out = {}
    for name, accumulation, mode in (("cached", K, "cached_features"), ("big", 1, "sum"), ("sum", K, "sum")):
        rows = B if accumulation > 1 else K * B

        def batches(start: int, total: int, accumulation=accumulation, rows=rows):
            for micro in range(start, total):  # micro-batch i of a K-step run is a slice of big batch i // K
                step, j = divmod(micro, accumulation)
                full = _data(rank, step, K * B)
                yield {k: v[j * rows:(j + 1) * rows] for k, v in full.items()}

        cfg = TrainVisionConfig(batch_size=rows, gradient_accumulation_steps=accumulation, accumulation=mode,
                                zero_stage=2 if world > 1 else 0, lr=2e-3, warmup_steps=0, max_steps=STEPS,
                                gradient_clipping=5.0, log_every=10**9, precision="fp32", schedule="constant")
        plan = TrainPlan(STEPS, STEPS, K * B * world, accumulation, "fp32")
        outcome = train(_model(), cfg, plan=plan, batches=batches, ctx=DistContext(rank, world, rank, CPU), seed=5,
                        ckpt_dir=None)
        for key in ("loss", "i2t_acc", "t2i_acc"):
            out[f"{name}/{key}"] = torch.tensor(outcome.history[key])
        out |= {f"{name}/param/{n}": p for n, p in outcome.params.items()}
    return out


def _rank_work(rank: int, world: int) -> dict[str, torch.Tensor]:
    return _gradients(rank, world, (0,) if world == 1 else (2, 3)) | _runs(rank, world)


@pytest.fixture(scope="module", params=[1, 2], ids=["1 rank", "2 ranks"])
def ranks(request, tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    world = request.param
    return run_ranks(_rank_work, tmp_path_factory.mktemp(f"world{world}"), world=world)


def _max_diff(got: dict, a: str, b: str, kind: str, skip: str = "") -> float:
    names = [k[len(a) + len(kind) + 2:] for k in got if k.startswith(f"{a}/{kind}/")]
    names = [n for n in names if not (skip and skip in n)]
    assert names
    return max((got[f"{a}/{kind}/{n}"] - got[f"{b}/{kind}/{n}"]).abs().max().item() for n in names)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_cached_features_loss_and_gradients_equal_one_big_batch(ranks, loss):
    for got in ranks:
        for zero in sorted({k.split("/")[1] for k in got if k.startswith(f"{loss}/zero")}):
            key = f"{loss}/{zero}"
            big, cached, summed = (got[f"{key}/{m}/stats"] for m in ("big", "cached", "sum"))
            # the full-batch loss and in-batch accuracies over K x B x world candidates
            assert cached == pytest.approx(big, abs=TOL), key
            scale = max(got[f"{key}/big/grad/{n}"].abs().max().item()
                        for n in ("head.weight", "logit_scale"))
            assert scale > 0.1  # gradients of a real size, so TOL is a tight bound
            assert _max_diff(got, f"{key}/cached", f"{key}/big", "grad") < TOL, key
            # the temperature's gradient counted once, not K times (open_clip counts it K times)
            assert got[f"{key}/cached/grad/logit_scale"] == pytest.approx(got[f"{key}/big/grad/logit_scale"], abs=TOL)
            # plain summation is a different objective: fewer negatives per positive (SigLIP's
            # loss value barely shows it at init: the -10 bias makes negatives cost ~e^-10 each)
            assert _max_diff(got, f"{key}/sum", f"{key}/big", "grad") > 100 * TOL, key
            if loss == "clip":
                assert summed[0] < big[0] - 0.1, key  # log(B x world) vs log(K x B x world) candidates


def test_training_with_cached_features_is_training_on_the_big_batch(ranks):
    """Whole runs through ``vision_trainer.train`` (data order, per-micro-batch seeds, logging,
    the optimizer, clipping and the logit-scale clamp): K x B cached == 1 x KB, step by step."""
    for got in ranks:
        for key in ("loss", "i2t_acc", "t2i_acc"):
            assert got[f"cached/{key}"].tolist() == pytest.approx(got[f"big/{key}"].tolist(), abs=TOL), key
        # Attention's key bias has a gradient of exactly 0 in exact arithmetic (softmax ignores a
        # shift shared by every key), so its float-noise gradient is all AdamW sees and it moves by
        # up to lr in any run; every other weight agrees to TOL (measured: <= 3e-7).
        assert _max_diff(got, "cached", "big", "param", skip="k_proj.bias") < TOL
        assert _max_diff(got, "sum", "big", "param") > 100 * TOL
        assert got["sum/loss"][0] < got["big/loss"][0] - 0.1  # mean of K losses over B x world candidates
    if len(ranks) > 1:  # every rank logs the same (mean over ranks), and the ranks saw different data
        assert ranks[0]["cached/loss"].tolist() == ranks[1]["cached/loss"].tolist()


# ------------------------------------------------------------------------------ single-rank checks


def _single_rank_checks(rank: int, world: int) -> dict[str, torch.Tensor]:
    from llm2clip.losses import create_loss

    out = {}
    batch = _data(rank, 0, K * B)

    # 1. Dropout: both forwards of a micro-batch draw the same masks (same seed), so the cached
    # step's gradient is that of the loss over K seeded forwards held in ONE graph.
    model = _model(tower={"kind": "vit_scratch", "config": TINY_VIT | {"attention_dropout": 0.3}, "image_size": 32})
    seeds = (11, 12, 13)
    stats, grads, _ = _one_step(model, "cached", batch, world, 0, seeds=seeds)
    reference = copy.deepcopy(model).train()
    parts = []
    for micro, seed in zip(_split(batch), seeds, strict=True):
        torch.manual_seed(seed)
        parts.append(reference(micro["pixels"], micro["text"]))
    full = {k: torch.cat([p[k] for p in parts]) for k in ("image_features", "text_features")}
    loss = create_loss("clip")(**full, logit_scale=parts[0]["logit_scale"])["loss"]
    loss.backward()
    out["dropout/loss"], out["dropout/reference_loss"] = stats[0], loss.detach()
    out["dropout/grad_diff"] = torch.tensor(max((grads[n] - p.grad).abs().max().item()
                                                for n, p in reference.named_parameters()))
    other, _, _ = _one_step(model, "cached", batch, world, 0, seeds=(21, 22, 23))
    out["dropout/other_seeds_loss"] = other[0]

    # 2. Memory: the graph held at any time is one micro-batch's. Saved-tensor bytes of the model
    # forwards, measured live: the cached step (K x B) peaks exactly where one micro-batch of B
    # does, every grad forward starts with nothing of the previous one alive, and the no-grad
    # pass saves nothing. The big batch (K x B in one graph) needs about K times as much.
    model = _model()
    peaks = {}
    for name, mode, rows in (("cached", "cached", batch), ("micro", "big", _split(batch)[0]), ("big", "big", batch)):
        saved = SavedTensors()
        _, _, probe = _one_step(model, mode, rows, world, 0, saved)  # "micro": one step on B rows alone
        peaks[name] = saved.peak
        out[f"memory/{name}/live_at_forward"] = torch.tensor(probe.live_at_forward)
        out[f"memory/{name}/live_after"] = torch.tensor(saved.live)
    out |= {f"memory/{name}/peak": torch.tensor(v) for name, v in peaks.items()}

    # 3. BatchNorm running statistics: updated once per micro-batch (by the grad pass), as with
    # "sum": the no-grad pass leaves them alone.
    model = _model(tower={"kind": "efficientnet_lite0", "image_size": 32, "pretrained": False})
    buffers = {}
    for mode in ("cached", "sum"):
        _, _, probe = _one_step(model, mode, batch, world, 0)  # trains a copy: probe.module
        buffers[mode] = {n: b for n, b in probe.module.named_buffers() if "running" in n or "num_batches" in n}
    out["bn/diff"] = torch.tensor(max((buffers["cached"][n].float() - buffers["sum"][n].float()).abs().max().item()
                                      for n in buffers["sum"]))
    out["bn/count"] = torch.tensor(len(buffers["sum"]))
    out["bn/moved"] = torch.tensor(max((buffers["sum"][n].float() - b.float()).abs().max().item()
                                       for n, b in model.named_buffers() if n in buffers["sum"]))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, torch.Tensor]:
    return run_ranks(_single_rank_checks, tmp_path_factory.mktemp("single"), world=1)[0]


def test_dropout_masks_are_the_same_in_both_forwards_of_a_micro_batch(single):
    assert single["dropout/loss"].item() == pytest.approx(single["dropout/reference_loss"].item(), abs=TOL)
    assert single["dropout/grad_diff"].item() < TOL
    # the masks matter: other seeds give another loss, so the equality above is not luck
    assert abs(single["dropout/other_seeds_loss"].item() - single["dropout/loss"].item()) > 1e-3


def test_graph_held_is_one_micro_batch(single):
    cached, micro, big = (single[f"memory/{m}/peak"].item() for m in ("cached", "micro", "big"))
    assert cached == micro > 10_000  # byte for byte the graph of one micro-batch of B rows
    assert big > 2 * micro  # one graph over K x B rows
    live = single["memory/cached/live_at_forward"].tolist()
    # K no-grad forwards (they save nothing) + K grad forwards, none of which starts while an
    # earlier micro-batch's graph is alive
    assert live == [0] * (2 * K)
    assert single["memory/cached/live_after"].item() == 0


def test_batchnorm_statistics_are_updated_once_per_micro_batch(single):
    assert single["bn/count"].item() > 10 and single["bn/moved"].item() > 1e-4
    assert single["bn/diff"].item() < TOL
