"""Public request → internal options: the limits the engine checks itself."""

from __future__ import annotations

import pytest

from tandem import slots as S
from tandem.v1 import generation_pb2 as pb
from tokenizer_svc import convert

EOS = frozenset({2, 3})


def options(**sampling):
    return convert.sampling_options(pb.SamplingParams(max_tokens=16, **sampling),
                                    num_prompt=4, max_context=64, default_max_tokens=8,
                                    eos_token_ids=EOS)


def test_min_tokens_refuses_more_ends_than_a_row_can_ban():
    stops = list(range(1000, 1000 + S.MAX_BANNED_IDS - len(EOS) + 1))  # one too many
    with pytest.raises(convert.InvalidRequest) as error:
        options(min_tokens=1, stop_token_ids=stops)
    message = str(error.value)
    assert message.startswith("sampling.stop_token_ids:") and "min_tokens" in message
    assert f"{S.MAX_BANNED_IDS + 1} distinct ids" in message
    assert f"more than the {S.MAX_BANNED_IDS}" in message


def test_ends_are_counted_once_and_only_with_min_tokens():
    fits = list(range(1000, 1000 + S.MAX_BANNED_IDS - len(EOS)))
    assert options(min_tokens=4, stop_token_ids=fits + [2, 3, 1000]).min_tokens == 4  # repeats
    many = list(range(1000, 1100))  # no bans without min_tokens: any number of stop ids
    assert options(stop_token_ids=many).stop_token_ids == frozenset(many)


def test_with_ignore_eos_only_the_stop_ids_count_toward_the_bans():
    fits = list(range(1000, 1000 + S.MAX_BANNED_IDS))  # a full row without EOS
    assert options(min_tokens=2, stop_token_ids=fits, ignore_eos=True).min_tokens == 2
    with pytest.raises(convert.InvalidRequest) as error:
        options(min_tokens=2, stop_token_ids=fits + [5000], ignore_eos=True)
    assert f"the stop_token_ids are {S.MAX_BANNED_IDS + 1} distinct ids" in str(error.value)


@pytest.fixture(scope="module")
def smollm2_tok():
    from tandem import models
    from tokenizer_svc.tokenization import ModelTokenizer

    return ModelTokenizer(models.resolve_model("embedded", models.default_cache_dir()).folder,
                          None)


def chat(*roles):
    return pb.GenerateRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role=r, content="hi") for r in roles]))


@pytest.mark.parametrize("template", [None, "{{ raise_exception('System role not supported') }}"])
def test_a_conversation_the_chat_template_cannot_render_is_invalid(smollm2_tok, monkeypatch,
                                                                   template):
    monkeypatch.setattr(smollm2_tok.tokenizer, "chat_template", template)
    with pytest.raises(convert.InvalidRequest) as error:
        convert.prompt_ids(chat("system", "user"), smollm2_tok)
    assert str(error.value).startswith("messages:")
    assert ("no chat template" if template is None else "System role not supported") \
        in str(error.value)


def test_a_final_assistant_turn_is_continued_when_asked(smollm2_tok):
    request = chat("user", "assistant")
    opened = convert.prompt_ids(request, smollm2_tok)
    request.messages.continue_final_message = True
    continued = convert.prompt_ids(request, smollm2_tok)
    closed_turn = convert.prompt_ids(chat("user"), smollm2_tok)  # "<|im_start|>assistant\n"
    assert continued[:len(closed_turn)] == closed_turn
    assert smollm2_tok.tokenizer.decode(continued[len(closed_turn):]) == "hi"  # left open
    assert opened[:len(continued)] == continued and len(opened) > len(continued)  # + end, prompt
    request.messages.messages[-1].role = "user"
    with pytest.raises(convert.InvalidRequest, match="continue_final_message"):
        convert.prompt_ids(request, smollm2_tok)


def test_the_engine_refuses_more_top_logprobs_than_a_slot_holds():
    def top(n):
        return convert.sampling_options(
            pb.SamplingParams(max_tokens=4, logprobs=True, top_logprobs=n), num_prompt=4,
            max_context=64, default_max_tokens=8, eos_token_ids=EOS, max_top_logprobs=20)

    assert top(20).top_logprobs == 20
    with pytest.raises(convert.InvalidRequest, match="top_logprobs: 25 exceeds the limit of 20"):
        top(25)


def test_logit_bias_is_sorted_and_the_engine_checks_what_a_slot_holds():
    assert options(logit_bias={9: 1.5, 4: -100.0}).logit_bias == ((4, -100.0), (9, 1.5))
    too_many = {i: 1.0 for i in range(S.MAX_LOGIT_BIAS + 1)}
    with pytest.raises(convert.InvalidRequest,
                       match=f"logit_bias: {S.MAX_LOGIT_BIAS + 1} ids, more than the "
                             f"{S.MAX_LOGIT_BIAS} allowed"):
        options(logit_bias=too_many)
    for bad in (float("nan"), float("inf"), 101.0):
        with pytest.raises(convert.InvalidRequest, match=r"logit_bias\[7\]: .* \[-100, 100\]"):
            options(logit_bias={7: bad})


def test_logprobs_name_their_tokens_by_their_text(smollm2_tok):
    from tokenizer_svc.request import RequestOutput, TokenLogprob

    world, hello = smollm2_tok.encode_text(" world")[0], smollm2_tok.encode_text("Hello")[0]
    out = RequestOutput("r", text=" world", token_ids=[world],
                        logprobs=[TokenLogprob(world, -0.5, [(world, -0.5), (hello, -2.0)])])
    (lp,) = convert.output_to_pb(out, "r", token_text=smollm2_tok.token_text).logprobs
    assert (lp.token_id, lp.token) == (world, " world")
    assert [(t.token_id, t.token) for t in lp.top] == [(world, " world"), (hello, "Hello")]
    (bare,) = convert.output_to_pb(out, "r").logprobs  # no tokenizer: ids only
    assert bare.token == "" and bare.top[1].token == ""
