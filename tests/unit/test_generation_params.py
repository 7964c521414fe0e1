"""SamplingParams: validation names NeMo-Aligner's config keys; from_config reads its YAML blocks."""
import pytest

from aligner.generation.params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize("kwargs,key", [
    ({"temperature": 0.0}, "model.ppo.sampling_params.temperature"),
    ({"temperature": -1.0}, "model.ppo.sampling_params.temperature"),
    ({"top_k": -1}, "model.ppo.sampling_params.top_k"),
    ({"top_k": 2.5}, "model.ppo.sampling_params.top_k"),
    ({"top_p": 0.0}, "model.ppo.sampling_params.top_p"),
    ({"top_p": 1.5}, "model.ppo.sampling_params.top_p"),
    ({"greedy": "yes"}, "model.ppo.sampling_params.greedy"),
    ({"end_strings": "<eos>"}, "model.ppo.sampling_params.end_strings"),
    ({"end_strings": ["ok", ""]}, "model.ppo.sampling_params.end_strings"),
    ({"max_length": 0}, "model.ppo.length_params.max_length"),
    ({"min_length": -1}, "model.ppo.length_params.min_length"),
    ({"min_length": 9, "max_length": 8}, "model.ppo.length_params.min_length"),
    ({"seed": "7"}, "model.ppo.sampling_params.seed"),
])
def test_invalid_values_name_the_config_key(kwargs, key):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_valid_values_are_kept():
    p = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, greedy=False, min_length=2, max_length=10,
                       end_strings=["a", "bc"], seed=4)
    assert (p.temperature, p.top_k, p.top_p, p.min_length, p.max_length, p.end_strings, p.seed) == \
        (0.5, 3, 0.9, 2, 10, ("a", "bc"), 4)


def test_from_config_reads_nemo_aligner_blocks():
    sampling = {"use_greedy": False, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0,
                "add_BOS": False, "all_probs": False, "compute_logprob": False,
                "end_strings": ["<|endoftext|>", "<extra_id_1>"]}
    length = {"max_length": 64, "min_length": 1}
    p = SamplingParams.from_config(sampling, length, seed=3)
    assert p == SamplingParams(temperature=0.8, top_k=0, top_p=0.95, greedy=False, min_length=1, max_length=64,
                               end_strings=("<|endoftext|>", "<extra_id_1>"), seed=3)
    assert SamplingParams.from_config({"greedy": True}, {"max_length": 4}).greedy is True


def test_from_config_rejects_unknown_and_unsupported_keys():
    with pytest.raises(SamplingParamsError, match=r"model\.ppo\.sampling_params\.tempreature: unknown key"):
        SamplingParams.from_config({"tempreature": 1.0}, {})
    with pytest.raises(SamplingParamsError, match=r"model\.ppo\.length_params\.max_len: unknown key"):
        SamplingParams.from_config({}, {"max_len": 3})
    with pytest.raises(SamplingParamsError, match=r"repetition_penalty"):
        SamplingParams.from_config({"repetition_penalty": 1.2}, {})
    with pytest.raises(SamplingParamsError, match=r"only one of greedy / use_greedy"):
        SamplingParams.from_config({"greedy": True, "use_greedy": True}, {})
    with pytest.raises(SamplingParamsError, match=r"model\.ppo\.length_params\.max_length"):
        SamplingParams.from_config({}, {"max_length": -2})
