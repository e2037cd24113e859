"""caption_contrastive.init_adapters: LLM2Vec-style base + LoRA adapters, merged in order at load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llm2clip.io import StageError
from llm2clip.text.adapters import check_adapter_dirs, merge_adapters
from llm2clip.text.loading import load_model

PREFIX = "base_model.model."


def write_adapter(model_dir, out, *, causal_lm: bool, targets, r: int, alpha: int, seed: int, **extra):
    """A LoRA adapter with random (non-zero) A and B, saved by peft on the tiny Llama."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_model(str(model_dir), causal_lm=causal_lm)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **extra)
    get_peft_model(model, config).save_pretrained(out)
    return out


def deltas(adapter_dir, strip: str = "") -> dict[str, torch.Tensor]:
    """``{backbone weight name: B @ A * alpha / r}`` straight from the adapter's files."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.removeprefix(PREFIX).split(".lora_A.")[0].removeprefix(strip)
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[f"{module}.weight"] = (b @ a) * config["lora_alpha"] / config["r"]
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    # like LLM2Vec: an "MNTP" adapter saved on the backbone, then a "supervised" one; the second was
    # saved on the causal LM (keys one "model." deeper) and covers only the last layer
    first = write_adapter(tiny_llama, root / "mntp", causal_lm=False, targets=("q_proj", "v_proj", "down_proj"),
                          r=4, alpha=8, seed=1)
    second = write_adapter(tiny_llama, root / "supervised", causal_lm=True, targets=("q_proj", "o_proj"),
                           r=2, alpha=16, seed=2, layers_to_transform=[1])
    return first, second


@pytest.mark.parametrize("causal_lm", [False, True])
def test_merged_weights_are_base_plus_every_lora_delta(tiny_llama, adapters, causal_lm):
    base = {k.removeprefix("model."): v.clone()
            for k, v in load_model(str(tiny_llama), causal_lm=causal_lm).state_dict().items()}
    merged_model = merge_adapters(load_model(str(tiny_llama), causal_lm=causal_lm), adapters)
    assert type(merged_model).__name__ == ("LlamaForCausalLM" if causal_lm else "LlamaModel")
    assert not any("lora" in n for n, _ in merged_model.named_parameters())  # no wrapper left
    merged = {k.removeprefix("model."): v for k, v in merged_model.state_dict().items()}

    expected = {k: v.clone() for k, v in base.items()}
    for delta in (deltas(adapters[0]), deltas(adapters[1], strip="model.")):
        assert delta
        for name, d in delta.items():
            expected[name] += d
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == set(deltas(adapters[0])) | set(deltas(adapters[1], strip="model."))
    assert "layers.1.self_attn.q_proj.weight" in changed and "layers.0.self_attn.o_proj.weight" not in changed
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_no_adapters_leaves_the_model_alone(tiny_llama):
    model = load_model(str(tiny_llama))
    assert merge_adapters(model, ()) is model


def test_a_missing_adapter_is_one_clear_error_before_anything_loads(adapters, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(StageError, match=r"caption_contrastive.init_adapters\[1\]: .*/nope does not exist; "
                                         r"expected a peft LoRA adapter dir"):
        check_adapter_dirs([adapters[0], tmp_path / "nope"])
    with pytest.raises(StageError, match=r"\[0\]: .*/half has no adapter_model.safetensors"):
        merge_adapters(torch.nn.Linear(2, 2), [tmp_path / "half"])  # never reaches the model
    info = check_adapter_dirs(adapters)
    assert [i["path"] for i in info] == [str(a) for a in adapters] and all(len(i["sha256"]) == 64 for i in info)


def test_an_adapter_of_another_model_is_refused(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaModel

    other = LlamaConfig(**{**LlamaModel.from_pretrained(str(tiny_llama)).config.to_dict(), "num_hidden_layers": 3})
    bigger = tmp_path / "bigger"
    LlamaModel(other).save_pretrained(bigger)
    adapter = write_adapter(bigger, tmp_path / "adapter", causal_lm=False, targets=("q_proj",), r=2, alpha=4,
                            seed=0)
    with pytest.raises(StageError, match=r"init_adapters\[0\]: .*adapter: its module names do not fit LlamaModel"):
        merge_adapters(load_model(str(tiny_llama)), [adapter])
