"""The whole service through real gRPC: correctness against Hugging Face, async
against sync, streaming, cancellation and seeds."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from tandem.v1 import generation_pb2 as pb
from tests.e2e.service import scrape

pytestmark = pytest.mark.e2e

NEW_TOKENS = 24
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a CPU does, then explain what a GPU does, and "
    "finally compare the two in a short paragraph for a curious ten-year-old child.",
]
TEXTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    " ".join(["In the beginning there was a long prompt that goes on and on."] * 30),
]


def chat_request(content, **sampling):
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)])
    return pb.GenerateRequest(messages=msgs, sampling=pb.SamplingParams(**sampling))


def text_request(text, **sampling):
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(**sampling))


def greedy_requests():
    reqs = [chat_request(c, max_tokens=NEW_TOKENS, temperature=0) for c in CHATS]
    reqs += [text_request(t, max_tokens=NEW_TOKENS, temperature=0) for t in TEXTS]
    return reqs


def stream(service, request, timeout=120):
    text, ids, last = "", [], None
    for msg in service.stub.GenerateStream(request, timeout=timeout):
        text += msg.text
        ids += list(msg.token_ids)
        last = msg
    return text, ids, last


def run_staggered(service, requests, gap=0.15):
    """Send all requests concurrently, arriving ``gap`` seconds apart."""
    results = [None] * len(requests)

    def worker(i):
        time.sleep(i * gap)
        try:
            results[i] = stream(service, requests[i])
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert not errors, f"{len(errors)} requests failed, e.g. {errors[0].details()}"
    return results


def hf_greedy(hf_model, prompt_ids, max_new):
    return hf_greedy_with(hf_model, prompt_ids, max_new)


def prompt_of(service, request):
    field = request.WhichOneof("input")
    tok_req = pb.TokenizeRequest(**{field: getattr(request, field)})
    return list(service.stub.Tokenize(tok_req, timeout=30).token_ids)


def test_greedy_matches_hugging_face_generate(async_service, async_results, hf_model):
    for request, (_text, ids, last) in zip(greedy_requests(), async_results, strict=False):
        prompt = prompt_of(async_service, request)
        assert last.usage.prompt_tokens == len(prompt)
        expected = hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert ids == expected, f"prompt {prompt[:8]}...: {ids} != HF {expected}"
        assert last.usage.completion_tokens == len(ids)
        reason = pb.FINISH_REASON_LENGTH if len(ids) == NEW_TOKENS else pb.FINISH_REASON_STOP
        assert last.finish_reason == reason


def test_tokenize_matches_the_model_tokenizer(async_service, hf_model):
    _, tok = hf_model
    assert prompt_of(async_service, text_request(TEXTS[1])) == tok(TEXTS[1])["input_ids"]
    chat = [{"role": "user", "content": CHATS[0]}]
    expected = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert prompt_of(async_service, chat_request(CHATS[0])) == list(expected)


def test_a_final_assistant_message_is_continued(async_service, hf_model):
    """continue_final_message: the prompt is the chat template's, the last turn left open,
    and the completion is the greedy continuation of exactly that prompt."""
    _, tok = hf_model
    chat = [{"role": "user", "content": CHATS[0]},
            {"role": "assistant", "content": "The answer, in one word:"}]
    expected = tok.apply_chat_template(chat, continue_final_message=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    request = pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat],
                                 continue_final_message=True),
        sampling=pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert prompt_of(async_service, request) == expected
    out = async_service.stub.Generate(request, timeout=120)
    alone = async_service.stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=expected), sampling=request.sampling), timeout=120)
    assert list(out.token_ids) == list(alone.token_ids) and len(out.token_ids) == 8
    del request.messages.messages[-1]
    request.messages.messages.add(role="user", content="And?")
    with pytest.raises(grpc.RpcError) as error:
        async_service.stub.Generate(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "continue_final_message" in error.value.details()


def test_async_equals_sync(sync_service, async_results):
    sync_results = run_staggered(sync_service, greedy_requests())
    for (a_text, a_ids, _), (s_text, s_ids, _) in zip(async_results, sync_results, strict=False):
        assert a_ids == s_ids and a_text == s_text


def test_preemption_and_recompute_keep_outputs_exact(tight_service, async_service):
    requests = [chat_request(c, max_tokens=40, temperature=0, ignore_eos=True) for c in CHATS]
    requests += [text_request(t, max_tokens=40, temperature=0, ignore_eos=True)
                 for t in TEXTS[:2]]
    roomy = run_staggered(async_service, requests, gap=0.05)
    tight = run_staggered(tight_service, requests, gap=0.05)
    assert [r[1] for r in tight] == [r[1] for r in roomy]
    assert tight_service.stats().num_preemptions > 0


def test_a_repeated_prompt_comes_from_the_prefix_cache_with_the_same_tokens(async_service,
                                                                         hf_model):
    request = text_request(TEXTS[3] + " Again.", max_tokens=8, temperature=0, ignore_eos=True)
    prompt = prompt_of(async_service, request)
    hits = "tandem_prefix_cache_hit_tokens_total"
    first = async_service.stub.Generate(request, timeout=120)
    before = scrape(async_service)[hits]
    second = async_service.stub.Generate(request, timeout=120)
    # every whole block of the prompt short of its last token (16-token blocks)
    assert scrape(async_service)[hits] - before == (len(prompt) - 1) // 16 * 16 > 300
    assert second.usage.cached_prompt_tokens == (len(prompt) - 1) // 16 * 16
    assert second.usage.prompt_tokens == len(prompt)
    assert list(first.token_ids) == list(second.token_ids) == hf_greedy(hf_model, prompt, 8)


def test_stream_concatenates_to_unary_text(async_service, async_results, hf_model):
    request = greedy_requests()[0]
    unary = async_service.stub.Generate(request, timeout=120)
    text, ids, last = async_results[0]
    assert unary.text == text and list(unary.token_ids) == ids
    assert unary.finish_reason == last.finish_reason
    usage = unary.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        last.usage.prompt_tokens, last.usage.completion_tokens)
    assert usage.cached_prompt_tokens <= (usage.prompt_tokens - 1) // 16 * 16  # a repeat
    _, tok = hf_model
    stop = ids[-1:] if last.finish_reason == pb.FINISH_REASON_STOP else []
    assert text == tok.decode(ids[: len(ids) - len(stop)], skip_special_tokens=True)


def test_cancelled_stream_frees_its_kv_blocks(async_service):
    before = async_service.stats()
    call = async_service.stub.GenerateStream(
        text_request(TEXTS[3], max_tokens=400, temperature=0, ignore_eos=True), timeout=120)
    for i, _ in enumerate(call):
        if i == 3:
            break
    assert async_service.stats().kv_blocks_free < before.kv_blocks_total
    call.cancel()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = async_service.stats()
        if stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0:
            break
        time.sleep(0.05)
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0


def test_seed_gives_the_same_text_twice(async_service):
    def sampled(seed):
        req = chat_request(CHATS[1], max_tokens=20, temperature=1.0, top_p=0.95, top_k=50,
                           seed=seed)
        return async_service.stub.Generate(req, timeout=120)

    first, second = sampled(1234), sampled(1234)
    assert first.text == second.text and list(first.token_ids) == list(second.token_ids)
    others = {tuple(sampled(s).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(first.token_ids)}) > 1  # seeds do change the draw


def test_min_p_one_samples_the_greedy_tokens(async_service, async_results):
    """min_p 1 keeps only the most likely token: a hot, seeded draw is then greedy."""
    _, ids, _ = async_results[0]
    req = chat_request(CHATS[0], max_tokens=NEW_TOKENS, temperature=1.5, min_p=1.0, seed=5)
    assert list(async_service.stub.Generate(req, timeout=120).token_ids) == ids
    req.sampling.min_p = 0.0  # the same draw without min-p is not greedy
    assert list(async_service.stub.Generate(req, timeout=120).token_ids) != ids


def test_logit_bias_forces_and_bans_tokens(async_service, async_results):
    _, ids, _ = async_results[0]
    forced = chat_request(CHATS[0], max_tokens=4, temperature=0, ignore_eos=True,
                          logit_bias={42: 100.0})
    assert list(async_service.stub.Generate(forced, timeout=120).token_ids) == [42] * 4
    banned = chat_request(CHATS[0], max_tokens=NEW_TOKENS, temperature=0,
                          logit_bias={ids[0]: -100.0})
    assert async_service.stub.Generate(banned, timeout=120).token_ids[0] != ids[0]


def test_seeded_output_does_not_depend_on_batch_neighbours(async_service):
    req = chat_request(CHATS[2], max_tokens=16, temperature=0.8, seed=99)
    alone = async_service.stub.Generate(req, timeout=120)
    crowd = run_staggered(async_service, [req] + greedy_requests()[:4], gap=0.0)
    assert crowd[0][1] == list(alone.token_ids)


def test_stop_strings_stop_tokens_and_ignore_eos(async_service, async_results):
    text, ids, _ = async_results[0]  # "The capital of France is Paris." or similar
    word = text.split()[2] if len(text.split()) > 2 else text[:3]
    cut = async_service.stub.Generate(chat_request(CHATS[0], max_tokens=NEW_TOKENS,
                                                   temperature=0, stop=[word]), timeout=60)
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == text[: text.index(word)] and word not in cut.text
    k = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)  # first new id
    by_token = async_service.stub.Generate(chat_request(
        CHATS[0], max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=[ids[k]]), timeout=60)
    assert list(by_token.token_ids) == ids[: k + 1]
    assert by_token.finish_reason == pb.FINISH_REASON_STOP
    long = async_service.stub.Generate(chat_request(
        CHATS[0], max_tokens=NEW_TOKENS + 8, temperature=0, ignore_eos=True), timeout=60)
    assert len(long.token_ids) == NEW_TOKENS + 8
    assert long.finish_reason == pb.FINISH_REASON_LENGTH


def test_model_info(async_service):
    info = async_service.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.vocab_size > 0 and info.max_context_tokens > 0 and info.eos_token_ids
    assert info.mode == "async" and info.kv_num_blocks > 0


def hf_logits(hf_model, prompt_ids, max_new, **kw):
    model, _ = hf_model
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=max_new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **kw)
    new = out.sequences[0, len(prompt_ids):].tolist()
    return new, [step[0].float().log_softmax(-1).cpu() for step in out.logits]


def test_logprobs_equal_log_softmax_of_the_model_logits(async_service, hf_model):
    request = chat_request(CHATS[2], max_tokens=8, temperature=0, logprobs=True,
                           top_logprobs=5)
    reply = async_service.stub.Generate(request, timeout=120)
    ids, logprobs = hf_logits(hf_model, prompt_of(async_service, request), 8)
    assert list(reply.token_ids) == ids[: len(reply.token_ids)]
    assert len(reply.logprobs) == len(reply.token_ids)
    for entry, expected in zip(reply.logprobs, logprobs, strict=False):
        assert entry.logprob == pytest.approx(expected[entry.token_id].item(), abs=2e-4)
        top_values, top_ids = expected.topk(5)
        assert [t.token_id for t in entry.top] == top_ids.tolist()
        assert [t.logprob for t in entry.top] == pytest.approx(top_values.tolist(), abs=2e-4)
        _, tok = hf_model  # each token named by its text
        assert [entry.token, *(t.token for t in entry.top)] == [
            tok.decode([i]) for i in [entry.token_id, *top_ids.tolist()]]


def test_min_tokens_bans_the_end_until_reached(async_service, hf_model, async_results):
    """min_tokens bans EOS and stop_token_ids until reached. The end tested is one the model
    really reaches early, whatever its weights: a token of its own greedy output, made a stop
    token."""
    _, ids, _ = async_results[0]
    k = max(i for i in range(len(ids)) if ids[i] not in ids[:i])  # its last new token
    stop = ids[k]
    early = async_service.stub.Generate(
        chat_request(CHATS[0], max_tokens=k + 10, stop_token_ids=[stop], temperature=0),
        timeout=120)
    assert list(early.token_ids) == ids[: k + 1]  # without min_tokens it ends there
    assert early.finish_reason == pb.FINISH_REASON_STOP
    n = k + 6
    request = chat_request(CHATS[0], max_tokens=n + 4, min_tokens=n, stop_token_ids=[stop],
                           temperature=0)
    reply = async_service.stub.Generate(request, timeout=120)
    ends = model_eos(hf_model) | {stop}
    assert len(reply.token_ids) >= n
    assert not ends & set(reply.token_ids[:n])
    expected = hf_greedy_with(hf_model, prompt_of(async_service, request), n + 4,
                              min_new_tokens=n, eos_token_id=sorted(ends))
    assert list(reply.token_ids) == expected


def model_eos(hf_model) -> set[int]:
    model, _ = hf_model
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def hf_greedy_with(hf_model, prompt_ids, max_new, **kw):
    """HF greedy output, cut after the first end token (`eos_token_id` in kw, or the model's)."""
    ids, _ = hf_logits(hf_model, prompt_ids, max_new, **kw)
    ends = set(kw.get("eos_token_id") or model_eos(hf_model))
    for i, t in enumerate(ids):
        if t in ends:
            return ids[: i + 1]
    return ids


def test_repetition_penalty_matches_transformers(async_service, hf_model):
    """The penalty must see every previous token, the one that was still a placeholder
    when the batch was prepared included."""
    request = text_request(TEXTS[2], max_tokens=NEW_TOKENS, temperature=0,
                           repetition_penalty=1.3)
    reply = async_service.stub.Generate(request, timeout=120)
    plain = async_service.stub.Generate(text_request(TEXTS[2], max_tokens=NEW_TOKENS,
                                                     temperature=0), timeout=120)
    expected = hf_greedy_with(hf_model, prompt_of(async_service, request), NEW_TOKENS,
                              repetition_penalty=1.3)
    assert list(reply.token_ids) == expected
    assert list(reply.token_ids) != list(plain.token_ids)  # the penalty changed something


def test_penalties_out_of_range_are_invalid(async_service):
    for sampling in (pb.SamplingParams(repetition_penalty=0.0),
                     pb.SamplingParams(presence_penalty=3.0),
                     pb.SamplingParams(frequency_penalty=float("nan"))):
        with pytest.raises(grpc.RpcError) as err:
            async_service.stub.Generate(pb.GenerateRequest(text="hi", sampling=sampling),
                                        timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "penalty" in err.value.details()
