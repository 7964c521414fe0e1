"""KVCacheSampler on a tiny random Llama (TP=1, in-process).

Two independent references: the same loop with full recomputation (`generate_no_cache`), and
`reference_generate` below, which handles one unpadded row at a time with a full forward and
does the sampling maths in float64 by hand. The second shares no code with the sampler, so it
also catches mistakes in the batching scheme (forced prompt tokens, padding, stopping).
"""
import dataclasses
import math

import pytest
import torch

from aligner.distributed.setup import initialize
from aligner.generation.params import SamplingParams
from aligner.generation.sampler import KVCacheSampler
from aligner.models.config import ModelConfig
from aligner.generation.streams import stream_key
from aligner.models.gpt import build_gpt, causal_attention_mask, position_ids_for
from tests.unit.test_generation_streams import reference_uniform

CONFIG = ModelConfig(arch="llama", vocab_size=96, hidden_size=48, ffn_hidden_size=96, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, max_position_embeddings=64)
EOS, PAD = 7, 0
LENGTHS = [3, 9, 5, 1, 7, 2]


class LogitBias:
    """Output-layer forward hook adding `value` to one token's logit: the tests' knob for how
    likely EOS is (a random model would otherwise almost never stop)."""

    def __init__(self, token: int):
        self.token, self.value = token, 0.0

    def __call__(self, module, inputs, output):
        logits, bias = output
        logits = logits.clone()
        logits[..., self.token] += self.value
        return logits, bias


@pytest.fixture(scope="module")
def model_and_bias():
    initialize(1, 1, seed=5)
    model = build_gpt(CONFIG, torch.float32)
    with torch.no_grad():
        model.output_layer.weight.mul_(15.0)  # peaked next-token distributions, like a trained model
    bias = LogitBias(EOS)
    model.output_layer.register_forward_hook(bias)
    return model, bias


@pytest.fixture
def model(model_and_bias):
    model, bias = model_and_bias
    bias.value = 0.0
    yield model
    bias.value = 0.0


@pytest.fixture
def eos_bias(model_and_bias):
    return model_and_bias[1]


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, CONFIG.vocab_size, (len(LENGTHS), max(LENGTHS)), generator=gen)
    lengths = torch.tensor(LENGTHS)
    tokens[torch.arange(tokens.shape[1]) >= lengths.unsqueeze(1)] = 55  # junk padding: must be ignored
    return tokens, lengths


def make_sampler(model, tokenizer=None, **kw):
    return KVCacheSampler(model, eos_id=EOS, pad_id=PAD, max_batch_size=8, max_sequence_length=40,
                          tokenizer=tokenizer, **kw)


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[B,S] -> [B,S,V] from one ordinary causal forward."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(tokens, position_ids_for(tokens), causal_attention_mask(tokens.shape[1], tokens.device),
                    runtime_gather_output=True)
    model.train(was_training)
    return out


def reference_probs(logits: list[float], params: SamplingParams, forbid_eos: bool) -> list[float]:
    """The sampling distribution for one row, in float64, by sorting and walking."""
    z = [x / params.temperature for x in logits]
    if forbid_eos:
        z[EOS] = -math.inf
    order = sorted(range(len(z)), key=lambda i: -z[i])
    kept = order
    if 0 < params.top_k < len(z):
        kept = [i for i in order if z[i] >= z[order[params.top_k - 1]]]
    weights = {i: math.exp(z[i] - z[order[0]]) for i in kept}
    total = sum(weights.values())
    if params.top_p < 1.0:
        nucleus, mass = {}, 0.0
        for i in kept:
            if mass >= params.top_p:
                break
            nucleus[i] = weights[i]
            mass += weights[i] / total
        weights = nucleus
    return [weights.get(i, 0.0) for i in range(len(z))]


def reference_generate(model, prompt_tokens, prompt_lengths, params: SamplingParams, tokenizer=None,
                       row_keys=None):
    """Row by row, no padding, full recomputation; float64 sampling.

    Follows the documented random-stream contract: starting at the shortest prompt, every step
    draws one uniform per batch row (whether or not that row uses it); with row_keys, a row's
    t-th token uses the plain-integer reference of counter_uniform(key, t) instead.
    Returns per row: (response token list, response logprob list, is_end).
    """
    gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
    lengths = prompt_lengths.tolist()
    seqs = [prompt_tokens[b, :n].tolist() for b, n in enumerate(lengths)]
    responses = [[] for _ in lengths]
    logprobs = [[] for _ in lengths]
    done, ended = [False] * len(lengths), [False] * len(lengths)
    position = min(lengths)
    while not all(done):
        uniform = torch.rand(len(lengths), generator=gen).tolist()
        for b in range(len(lengths)):
            if done[b] or position < lengths[b]:
                continue
            row = full_logits(model, torch.tensor([seqs[b]]))[0, -1].double().tolist()
            forbid = len(responses[b]) < params.min_length
            if params.greedy:
                z = list(row)
                if forbid:
                    z[EOS] = -math.inf
                token = max(range(len(z)), key=lambda i: z[i])
            else:
                weights = reference_probs(row, params, forbid)
                u = uniform[b] if row_keys is None else reference_uniform(row_keys[b], len(responses[b]))
                target, cumulative, token = u * sum(weights), 0.0, None
                for i, w in enumerate(weights):
                    cumulative += w
                    if cumulative > target:
                        token = i
                        break
            lse = math.log(sum(math.exp(x - max(row)) for x in row)) + max(row)
            seqs[b].append(token)
            responses[b].append(token)
            logprobs[b].append(row[token] - lse)
            hit_string = tokenizer is not None and any(
                tokenizer.decode(responses[b]).endswith(s) for s in params.end_strings)
            if token == EOS or hit_string:
                done[b] = ended[b] = True
            elif len(responses[b]) == params.max_length:
                done[b] = True
        position += 1
    return [(responses[b], logprobs[b], ended[b]) for b in range(len(lengths))]


def assert_matches_reference(out, reference, prompt_tokens, prompt_lengths):
    assert out.tokens.shape[1] == max(int(n) + len(r[0]) for n, r in zip(prompt_lengths, reference))
    for b, (response, logprobs, ended) in enumerate(reference):
        n = int(prompt_lengths[b])
        assert out.tokens[b, :n].tolist() == prompt_tokens[b, :n].tolist()
        assert out.tokens[b, n:n + len(response)].tolist() == response, b
        assert (out.tokens[b, n + len(response):] == PAD).all()
        assert int(out.response_lengths[b]) == len(response)
        assert bool(out.is_end[b]) == ended
        assert torch.allclose(out.generator_logprobs[b, n - 1:n - 1 + len(response)].double(),
                              torch.tensor(logprobs, dtype=torch.float64), atol=1e-5, rtol=0)
        rest = torch.ones(out.generator_logprobs.shape[1], dtype=torch.bool)
        rest[n - 1:n - 1 + len(response)] = False
        assert (out.generator_logprobs[b, rest] == 0).all()


PARAMS = {
    "greedy": SamplingParams(greedy=True, min_length=0, max_length=12, seed=0),
    "sampling": SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_length=0, max_length=12, seed=123),
}


@pytest.mark.parametrize("kind", ["greedy", "sampling"])
def test_kv_cache_matches_recomputation_and_row_by_row_reference(model, eos_bias, prompts, kind):
    eos_bias.value = 3.0 if kind == "greedy" else 2.0
    params = PARAMS[kind]
    sampler = make_sampler(model)
    cached = sampler.generate(*prompts, params)
    recomputed = sampler.generate_no_cache(*prompts, params)
    # the case is only interesting if some rows stop early and others run out of budget
    assert cached.is_end.any() and not cached.is_end.all(), cached.is_end
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert torch.equal(cached.response_lengths, recomputed.response_lengths)
    assert torch.equal(cached.is_end, recomputed.is_end)
    assert torch.allclose(cached.generator_logprobs, recomputed.generator_logprobs, atol=1e-5, rtol=0)
    assert_matches_reference(cached, reference_generate(model, *prompts, params), *prompts)


ROW_KEYS = [stream_key(123, row) for row in range(len(LENGTHS))]


def test_row_keyed_streams_match_recomputation_and_reference(model, eos_bias, prompts):
    eos_bias.value = 2.0
    params = PARAMS["sampling"]
    sampler = make_sampler(model)
    cached = sampler.generate(*prompts, params, row_keys=ROW_KEYS)
    recomputed = sampler.generate_no_cache(*prompts, params, row_keys=ROW_KEYS)
    assert cached.is_end.any() and not cached.is_end.all(), cached.is_end
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert_matches_reference(cached, reference_generate(model, *prompts, params, row_keys=ROW_KEYS), *prompts)
    # the keys, not params.seed, decide the draws
    assert not torch.equal(cached.tokens, sampler.generate(*prompts, params).tokens)
    reseeded = sampler.generate(*prompts, dataclasses.replace(params, seed=999), row_keys=ROW_KEYS)
    assert torch.equal(cached.tokens, reseeded.tokens)


def test_row_keyed_samples_do_not_depend_on_the_rest_of_the_batch(model, eos_bias, prompts):
    """What makes rollouts independent of the parallel layout: a row keeps its samples when the
    batch is reordered or split into other micro-batches (other shortest/longest prompts)."""
    eos_bias.value = 2.0
    params = dataclasses.replace(PARAMS["sampling"], top_k=0, top_p=1.0, temperature=1.0)
    sampler = make_sampler(model)
    tokens, lengths = prompts
    whole = sampler.generate(tokens, lengths, params, row_keys=ROW_KEYS)

    def response(out, row):
        n, r = int(out.prompt_lengths[row]), int(out.response_lengths[row])
        return out.tokens[row, n:n + r].tolist(), out.generator_logprobs[row, n - 1:n - 1 + r]

    order = [4, 1, 5, 0, 3, 2]
    for parts in ([order], [order[:2], order[2:]], [[r] for r in order]):
        for rows in parts:
            out = sampler.generate(tokens[rows], lengths[rows], params, row_keys=[ROW_KEYS[r] for r in rows])
            for i, row in enumerate(rows):
                got, want = response(out, i), response(whole, row)
                assert got[0] == want[0], (parts, row)
                assert torch.allclose(got[1], want[1], atol=1e-5, rtol=0)
    # and a row's draws are its own: giving row 0 row 1's key changes row 0's sample
    swapped = sampler.generate(tokens, lengths, params, row_keys=[ROW_KEYS[1]] + ROW_KEYS[1:])
    assert response(swapped, 0)[0] != response(whole, 0)[0]


def test_row_keys_must_match_the_batch(model, prompts):
    with pytest.raises(ValueError, match="row_keys must be one key per prompt"):
        make_sampler(model).generate(*prompts, PARAMS["sampling"], row_keys=ROW_KEYS[:2])


def test_generator_logprobs_equal_a_separate_full_forward(model, eos_bias, prompts):
    """Under the model's own distribution: EOS suppression (min_length) and temperature/top-k/top-p
    change what is sampled, never the recorded log-probs."""
    eos_bias.value = 2.0
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_length=3, max_length=12, seed=123)
    out = make_sampler(model).generate(*prompts, params)
    logsoftmax = torch.log_softmax(full_logits(model, out.tokens).double(), dim=-1)
    expected = logsoftmax[:, :-1].gather(-1, out.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = out.response_mask()
    assert mask.sum() == out.response_lengths.sum()
    assert torch.allclose(out.generator_logprobs.double()[mask], expected[mask], atol=1e-5, rtol=0)
    assert (out.generator_logprobs[~mask] == 0).all()


def test_fixed_seed_reproduces_and_other_seeds_differ(model, prompts):
    sampler = make_sampler(model)
    params = SamplingParams(temperature=1.0, max_length=10, min_length=0, seed=77)
    first, second = sampler.generate(*prompts, params), sampler.generate(*prompts, params)
    assert torch.equal(first.tokens, second.tokens)
    other = sampler.generate(*prompts, SamplingParams(temperature=1.0, max_length=10, min_length=0, seed=78))
    assert not torch.equal(first.tokens, other.tokens)


def test_min_length_forbids_early_eos(model, eos_bias, prompts):
    eos_bias.value = 30.0  # EOS is by far the most likely token everywhere
    sampler = make_sampler(model)
    free = sampler.generate(*prompts, SamplingParams(greedy=True, min_length=0, max_length=10))
    assert (free.response_lengths == 1).all() and free.is_end.all()  # precondition: EOS straight away
    held = sampler.generate(*prompts, SamplingParams(greedy=True, min_length=4, max_length=10))
    for b in range(len(LENGTHS)):
        n = LENGTHS[b]
        assert EOS not in held.tokens[b, n:n + 4].tolist()
    # the first allowed position is EOS again
    assert (held.response_lengths == 5).all() and held.is_end.all()
    assert held.tokens[torch.arange(len(LENGTHS)), held.prompt_lengths + 4].eq(EOS).all()


def test_max_length_and_no_end(model, eos_bias, prompts):
    eos_bias.value = -100.0  # never EOS
    out = make_sampler(model).generate(*prompts, SamplingParams(temperature=1.0, max_length=6, seed=1))
    assert out.response_lengths.tolist() == [6] * len(LENGTHS)
    assert not out.is_end.any()
    assert out.tokens.shape == (len(LENGTHS), max(LENGTHS) + 6)
    assert out.generator_logprobs.shape == (len(LENGTHS), max(LENGTHS) + 5)


def test_eos_rows_end_with_eos_then_pad(model, eos_bias, prompts):
    eos_bias.value = 2.0
    out = make_sampler(model).generate(*prompts, SamplingParams(temperature=1.0, max_length=12, min_length=0,
                                                                 seed=5))
    assert out.is_end.any() and not out.is_end.all()
    for b in range(len(LENGTHS)):
        n, r = LENGTHS[b], int(out.response_lengths[b])
        response = out.tokens[b, n:n + r].tolist()
        if out.is_end[b]:
            assert response[-1] == EOS and EOS not in response[:-1]
        else:
            assert r == 12 and EOS not in response
        assert (out.tokens[b, n + r:] == PAD).all()


class CharTokenizer:
    """Token t decodes to one distinct character."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(0x100 + int(t)) for t in ids)


def test_end_strings_stop_rows(model, eos_bias, prompts):
    eos_bias.value = -100.0
    tok = CharTokenizer()
    sampler = make_sampler(model, tokenizer=tok)
    base = SamplingParams(temperature=1.0, max_length=14, seed=9)
    free = sampler.generate(*prompts, base)
    # end string = the 3rd and 4th tokens of row 1's response: row 1 must stop after 4 tokens
    n1 = LENGTHS[1]
    end = tok.decode(free.tokens[1, n1 + 2:n1 + 4].tolist())
    params = SamplingParams(temperature=1.0, max_length=14, seed=9, end_strings=[end, "\u0000never"])
    stopped = sampler.generate(*prompts, params)
    assert_matches_reference(stopped, reference_generate(model, *prompts, params, tokenizer=tok), *prompts)
    assert bool(stopped.is_end[1]) and int(stopped.response_lengths[1]) <= 4
    # a row's samples do not depend on when other rows stop: stopped = truncated free run
    for b in range(len(LENGTHS)):
        n, r = LENGTHS[b], int(stopped.response_lengths[b])
        assert stopped.tokens[b, :n + r].tolist() == free.tokens[b, :n + r].tolist()


def test_greedy_batch_equals_each_prompt_alone(model, eos_bias, prompts):
    eos_bias.value = 3.0
    sampler = make_sampler(model)
    params = SamplingParams(greedy=True, min_length=2, max_length=8)
    batch = sampler.generate(*prompts, params)
    for b in range(len(LENGTHS)):
        alone = sampler.generate(prompts[0][b:b + 1, :LENGTHS[b]], prompts[1][b:b + 1], params)
        width = alone.tokens.shape[1]
        assert batch.tokens[b, :width].tolist() == alone.tokens[0].tolist()
        assert (batch.tokens[b, width:] == PAD).all()
        assert torch.allclose(batch.generator_logprobs[b, :width - 1], alone.generator_logprobs[0], atol=1e-5)


def test_restores_training_mode_and_builds_no_graph(model, prompts):
    model.train()
    out = make_sampler(model).generate(*prompts, SamplingParams(max_length=3, seed=0))
    assert model.training and all(m.training for m in model.modules())
    assert not out.generator_logprobs.requires_grad
    model.eval()
    make_sampler(model).generate(*prompts, SamplingParams(max_length=3, seed=0))
    assert not model.training


def test_vocab_size_excludes_padded_ids(model, prompts):
    out = make_sampler(model, vocab_size=40).generate(*prompts, SamplingParams(max_length=12, seed=2))
    positions = torch.arange(out.tokens.shape[1]).unsqueeze(0)
    response = (positions >= out.prompt_lengths.unsqueeze(1)) & (positions < out.sequence_lengths.unsqueeze(1))
    assert response.sum() == out.response_lengths.sum() > 0
    assert (out.tokens[response] < 40).all()


def test_input_errors(model, prompts, monkeypatch):
    sampler = make_sampler(model)
    with pytest.raises(ValueError, match="max_batch_size=8"):
        sampler.generate(torch.ones(9, 3, dtype=torch.long), torch.full((9,), 3), SamplingParams(max_length=2))
    with pytest.raises(ValueError, match=r"model\.ppo\.length_params\.max_length"):
        sampler.generate(*prompts, SamplingParams(max_length=35))
    with pytest.raises(ValueError, match=r"end_strings needs a tokenizer"):
        sampler.generate(*prompts, SamplingParams(max_length=2, end_strings=["x"]))
    with pytest.raises(ValueError, match=r"prompt_lengths"):
        sampler.generate(prompts[0], torch.tensor([0, 1, 1, 1, 1, 1]), SamplingParams(max_length=2))
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match=r"model\.pipeline_model_parallel_size"):
        make_sampler(model)


def test_gpt2_learned_positions_cache_matches_reference(model_and_bias, prompts):
    """GPT-2 style models read position ids (RoPE models ignore them): the cached steps must pass
    each token's true position."""
    gpt2 = build_gpt(ModelConfig(arch="gpt2", vocab_size=96, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=True),
                     torch.float32)
    with torch.no_grad():
        gpt2.embedding.position_embeddings.weight.mul_(50.0)  # make positions matter
        gpt2.embedding.word_embeddings.weight.mul_(20.0)
    params = SamplingParams(temperature=0.8, max_length=6, min_length=0, seed=4)
    out = make_sampler(gpt2).generate(*prompts, params)
    assert_matches_reference(out, reference_generate(gpt2, *prompts, params), *prompts)


def test_megatron_local_attention_cache_matches_reference(model_and_bias, prompts):
    """The same scheme through megatron's own unfused attention (attention_backend=local)."""
    local = build_gpt(dataclasses.replace(CONFIG, attention_backend="local"), torch.float32)
    with torch.no_grad():
        local.output_layer.weight.mul_(15.0)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_length=6, min_length=0, seed=6)
    out = make_sampler(local).generate(*prompts, params)
    assert_matches_reference(out, reference_generate(local, *prompts, params), *prompts)
