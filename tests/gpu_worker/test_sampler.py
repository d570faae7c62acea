"""The sampler: greedy, bans, top-k/top-p/min-p, seeds and the distribution it draws from."""

import dataclasses

import torch

from gpu_worker.sampler import SamplingBatch, sample, uniform_noise


def batch(rows, temperature=1.0, top_p=1.0, top_k=0, seed=7, position=None, banned=None,
          min_p=None, bias=None):
    return SamplingBatch(
        temperature=torch.full((rows,), temperature), top_p=torch.full((rows,), top_p),
        top_k=torch.full((rows,), top_k, dtype=torch.long),
        seed=torch.full((rows,), seed, dtype=torch.long),
        position=torch.arange(rows) if position is None else position,
        num_top_logprobs=0, want_logprobs=False, all_greedy=temperature <= 0,
        any_truncation=top_k > 0 or top_p < 1, banned_ids=banned,
        min_p=None if min_p is None else torch.as_tensor(min_p, dtype=torch.float32),
        bias=bias)


def test_greedy_is_argmax_and_bans_apply():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, batch(4, temperature=0)).token_ids, logits.argmax(-1))
    top = logits.argmax(-1)
    banned = torch.stack([top, torch.full_like(top, -1)], dim=1)
    out = sample(logits, batch(4, temperature=0, banned=banned)).token_ids
    assert not torch.equal(out, top) and all(out[i] != top[i] for i in range(4))
    assert torch.equal(out, logits.scatter(1, top[:, None], float("-inf")).argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(8, 100)
    assert torch.equal(sample(logits, batch(8, top_k=1)).token_ids, logits.argmax(-1))
    assert torch.equal(sample(logits, batch(8, top_p=1e-6)).token_ids, logits.argmax(-1))


def test_top_k_keeps_only_the_k_best():
    logits = torch.randn(1, 100).repeat(400, 1)
    out = sample(logits, batch(400, top_k=3)).token_ids
    assert set(out.tolist()) <= set(logits[0].topk(3).indices.tolist())
    assert len(set(out.tolist())) == 3


def test_min_p_keeps_the_tokens_at_least_min_p_as_likely_as_the_best():
    """Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.25 keeps those >= 0.125 (the first three),
    min_p 1 only the best, min_p 0 all four; a row's min_p is its own."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(3000, 1)
    drawn = sample(logits, batch(3000, min_p=torch.full((3000,), 0.25))).token_ids
    assert set(drawn.tolist()) == {0, 1, 2}
    freq = torch.bincount(drawn, minlength=3).float() / 3000  # renormalised over the three
    assert torch.allclose(freq, probs[:3] / probs[:3].sum(), atol=0.03)
    assert (sample(logits, batch(3000, min_p=torch.ones(3000))).token_ids == 0).all()
    assert set(sample(logits, batch(3000, min_p=torch.zeros(3000))).token_ids.tolist()) == \
        {0, 1, 2, 3}
    mixed = torch.tensor([1.0, 0.0] * 1500)
    out = sample(logits, batch(3000, min_p=mixed)).token_ids
    assert (out[0::2] == 0).all() and set(out[1::2].tolist()) == {0, 1, 2, 3}


def test_min_p_is_taken_after_temperature_and_with_top_k():
    """Temperature 2 flattens [0.5, 0.3, 0.15, 0.05] to ratios sqrt(p / p_max): 1, 0.77,
    0.55, 0.32, so min_p 0.5 keeps three; top_k 2 on top of it keeps two."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(3000, 1)
    hot = sample(logits, batch(3000, temperature=2.0, min_p=torch.full((3000,), 0.5)))
    assert set(hot.token_ids.tolist()) == {0, 1, 2}
    both = sample(logits, batch(3000, temperature=2.0, top_k=2,
                                min_p=torch.full((3000,), 0.5)))
    assert set(both.token_ids.tolist()) == {0, 1}


def test_logit_bias_moves_greedy_and_drawn_tokens_but_not_the_logprobs():
    logits = torch.randn(3, 40)
    top = logits.argmax(-1)
    ids = torch.tensor([[7, -1], [int(top[1]), 50], [-1, -1]], dtype=torch.int32)
    values = torch.tensor([[100.0, 5.0], [-100.0, 100.0], [9.0, 9.0]])
    out = sample(logits, dataclasses.replace(batch(3, temperature=0, bias=(ids, values)),
                                             want_logprobs=True))
    # row 0 is forced to 7; row 1 loses its best (id 50 is outside the vocabulary:
    # dropped); row 2's padding biases nothing
    second = logits[1].clone()
    second[top[1]] = float("-inf")
    assert out.token_ids.tolist() == [7, int(second.argmax()), int(top[2])]
    assert torch.allclose(out.logprobs, logits.log_softmax(-1).gather(
        -1, out.token_ids[:, None]).squeeze(-1))
    hot = sample(logits.repeat(100, 1), batch(300, bias=(ids.repeat(100, 1),
                                                         values.repeat(100, 1)))).token_ids
    assert (hot[0::3] == 7).all() and (hot[1::3] != top[1]).all()


def test_noise_is_a_function_of_seed_and_position_only():
    a = uniform_noise(torch.tensor([1, 2]), torch.tensor([5, 5]), 64)
    b = uniform_noise(torch.tensor([2, 1, 1]), torch.tensor([5, 5, 6]), 64)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and not torch.equal(a[0], b[2])
    assert a.min() > 0 and a.max() < 1


def test_noise_never_reaches_one_and_removed_tokens_stay_removed():
    """Over a Llama-3-sized vocabulary a row now and then draws the largest noise value
    (seed 27 at position 100 did, at index 65,920, when the noise had 24 bits and that
    value rounded to 1.0): it must stay below 1, its Gumbel noise finite, or a token that
    top-k or a ban removed could win."""
    vocab, rows = 128256, 16
    seeds, position = torch.arange(20, 20 + rows), torch.full((rows,), 100)
    u = uniform_noise(seeds, position, vocab)
    assert u.max() < 1 and u.min() > 0
    assert torch.isfinite(-torch.log(-torch.log(u))).all()

    def draw(logits, top_k, banned):
        return sample(logits, SamplingBatch(
            temperature=torch.ones(rows), top_p=torch.ones(rows),
            top_k=torch.full((rows,), top_k), seed=seeds, position=position,
            num_top_logprobs=0, want_logprobs=False, all_greedy=False,
            any_truncation=top_k > 0, banned_ids=banned)).token_ids

    logits = torch.zeros(rows, vocab)
    logits[:, 5] = 30.0
    assert (draw(logits, 1, None) == 5).all()
    banned = torch.tensor([[5, 65920]] * rows)
    assert not torch.isin(draw(logits, 0, banned), banned[0]).any()


def test_draws_follow_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20000, 1)
    out = sample(logits, batch(20000)).token_ids
    freq = torch.bincount(out, minlength=4).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)


def test_presence_and_frequency_penalties_count_only_the_output():
    from gpu_worker.sampler import Penalties

    logits = torch.zeros(1, 6)
    history = torch.tensor([[1, 1, 2, 3, 3, 3, -2]])  # prompt: [1, 1]; output: 2, 3, 3, 3
    p = Penalties(history, prompt_lens=torch.tensor([2]), repetition=torch.tensor([1.0]),
                  presence=torch.tensor([0.5]), frequency=torch.tensor([0.25]))
    b = batch(1, temperature=0)
    b.penalties = p
    from gpu_worker.sampler import _penalise

    out = _penalise(logits, p)
    assert out[0].tolist() == [0, 0, -0.75, -1.25, 0, 0]
    assert sample(torch.tensor([[0.0, 0.0, 0.1, 0.2, 0.0, 0.05]]), b).token_ids.item() == 5


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    from gpu_worker.sampler import Penalties, _penalise

    logits = torch.tensor([[2.0, -2.0, 1.0]])
    p = Penalties(torch.tensor([[0, 1]]), prompt_lens=torch.tensor([2]),
                  repetition=torch.tensor([2.0]), presence=torch.zeros(1),
                  frequency=torch.zeros(1))
    assert _penalise(logits, p)[0].tolist() == [1.0, -4.0, 1.0]
