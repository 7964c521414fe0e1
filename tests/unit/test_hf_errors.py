"""Inputs the Hugging Face importer must refuse, each with a message naming what was found and
what is supported (or which tensor disagrees with config.json, with both shapes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.unit.test_hf_convert import make_hf_model, save_hf_case


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from aligner.distributed import setup

    setup.initialize(1, 1, seed=5)


def edit_config(path: Path, **changes) -> Path:
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))
    return path


def load(path: Path, scalar_head: bool = False):
    from aligner.models.gpt import build_gpt
    from aligner.models.hf import convert

    config = convert.model_config_from_hf(path)
    model = build_gpt(config, torch.float32, scalar_head=scalar_head)
    convert.load_hf_weights(path, model, config, scalar_head=scalar_head)
    return model


def test_directory_of_neither_format(tmp_path):
    from aligner.models.pretrained import PretrainedFormatError, detect_format

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PretrainedFormatError, match=r"neither a native aligner checkpoint.*Hugging Face.*notes\.txt"):
        detect_format(str(tmp_path))


def test_config_without_weights(tmp_path):
    from aligner.models.hf.errors import HFFormatError

    path = save_hf_case(tmp_path, "llama_mha")
    (path / "model.safetensors").unlink()
    (path / "README.md").write_text("weights elsewhere")
    with pytest.raises(HFFormatError, match=r"no weights found \(expected model\.safetensors.*README\.md"):
        load(path)


@pytest.mark.parametrize("changes, found, supported", [
    (dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2"), "'Gemma2ForCausalLM'", "Qwen3ForCausalLM"),
    (dict(architectures=["T5ForConditionalGeneration"], model_type="t5"), "'T5ForConditionalGeneration'",
     "GPT2LMHeadModel"),
    (dict(attention_bias=True), '"attention_bias": True', "False"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}), "'yarn'", "'llama3'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "'linear'", "'default'"),
    (dict(hidden_act="gelu"), '"hidden_act": \'gelu\'', "'silu'"),
    (dict(mlp_bias=True), '"mlp_bias": True', "False"),
    (dict(model_type="qwen2"), "model_type='qwen2'", "LlamaForCausalLM"),
])
def test_unsupported_llama_options(tmp_path, changes, found, supported):
    from aligner.models.hf import convert
    from aligner.models.hf.errors import HFFormatError

    path = edit_config(save_hf_case(tmp_path, "llama_mha"), **changes)
    with pytest.raises(HFFormatError) as info:
        convert.model_config_from_hf(path)
    message = str(info.value)
    assert found in message and supported in message and "config.json" in message, message


def test_sliding_window_mistral_imported(tmp_path):
    """Formerly refused; now implemented exactly (tests/unit/test_hf_families.py checks the logits)."""
    from aligner.models.hf import convert

    path = save_hf_case(tmp_path, "mistral", sliding_window=16)
    assert convert.model_config_from_hf(path).sliding_window == 16


def test_mixtral_top1_refused(tmp_path):
    from aligner.models.hf import convert
    from aligner.models.hf.errors import HFFormatError

    path = edit_config(save_hf_case(tmp_path, "mixtral"), num_experts_per_tok=1)
    with pytest.raises(HFFormatError, match=r"\"num_experts_per_tok\": 1 is not supported.*supported: 2 or more"):
        convert.model_config_from_hf(path)


@pytest.mark.parametrize("changes, found", [
    (dict(activation_function="relu"), "'relu'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_gpt2_options(tmp_path, changes, found):
    from aligner.models.hf import convert
    from aligner.models.hf.errors import HFFormatError

    path = edit_config(save_hf_case(tmp_path, "gpt2"), **changes)
    with pytest.raises(HFFormatError, match="supported") as info:
        convert.model_config_from_hf(path)
    assert found in str(info.value)


def test_edited_hidden_size_names_tensor_and_shapes(tmp_path):
    from aligner.models.hf.errors import HFFormatError

    path = edit_config(save_hf_case(tmp_path, "llama_mha"), hidden_size=48, head_dim=12)
    with pytest.raises(HFFormatError) as info:
        load(path)
    message = str(info.value)
    assert "model.embed_tokens.weight has shape [96, 32] but config.json implies [96, 48]" in message, message


def test_missing_tensor_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from aligner.models.hf.errors import HFFormatError

    path = save_hf_case(tmp_path, "gpt2")
    state = load_file(str(path / "model.safetensors"))
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"missing 1 tensor.*transformer\.h\.1\.mlp\.c_fc\.bias"):
        load(path)


def test_leftover_tensors_named(tmp_path):
    """Fewer layers in config.json than in the weights, or an unknown bias: nothing is dropped silently."""
    from safetensors.torch import load_file, save_file

    from aligner.models.hf.errors import HFFormatError

    path = edit_config(save_hf_case(tmp_path, "llama_gqa"), num_hidden_layers=1)
    with pytest.raises(HFFormatError, match=r"no place for.*model\.layers\.1\."):
        load(path)

    path = save_hf_case(tmp_path / "bias", "llama_mha")
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"no place for.*q_proj\.bias"):
        load(path)


def test_classifier_with_several_labels_refused(tmp_path):
    from aligner.models.hf.errors import HFFormatError

    model = make_hf_model("llama_mha", head="score")
    model.score = torch.nn.Linear(32, 3, bias=False)
    model.config.num_labels = 3
    model.save_pretrained(tmp_path / "rm3")
    with pytest.raises(HFFormatError, match=r"score\.weight has shape \[3, 32\] but config\.json implies \[1, 32\]"):
        load(tmp_path / "rm3", scalar_head=True)


def test_untied_classifier_as_policy_refused(tmp_path):
    from aligner.models.hf.errors import HFFormatError

    path = save_hf_case(tmp_path, "llama_mha", head="score")
    with pytest.raises(HFFormatError, match=r"no language-model head.*scalar head"):
        load(path, scalar_head=False)
