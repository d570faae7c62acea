"""The gateway's multiplexed engine stream (``--engine-streams multiplexed``): one
GenerateMany stream carries every request, and clients see exactly what a stream per
request gives them: the same tokens, errors, cancellation, deadlines and refusals."""

from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tests.e2e import test_errors as errors
from tests.e2e import test_generation as generation
from tests.e2e import test_serving as serving

pytestmark = pytest.mark.e2e


def test_outputs_equal_those_of_a_stream_per_request(mux_service, async_results):
    # all at once, so that engine messages carry several requests' news
    mux = generation.run_staggered(mux_service, generation.greedy_requests(), gap=0.0)
    for (a_text, a_ids, a_last), (m_text, m_ids, m_last) in zip(async_results, mux,
                                                                strict=True):
        assert (m_ids, m_text) == (a_ids, a_text)  # and so equal to HF generate()
        assert m_last.finish_reason == a_last.finish_reason
        assert m_last.usage.completion_tokens == a_last.usage.completion_tokens
        assert m_last.usage.prompt_tokens == a_last.usage.prompt_tokens
    unary = mux_service.stub.Generate(generation.greedy_requests()[0], timeout=120)
    assert (unary.text, list(unary.token_ids)) == async_results[0][:2]


@pytest.mark.parametrize("name", list(errors.CASES))
def test_bad_input_is_invalid_argument(mux_service, name):
    errors.test_bad_input_is_invalid_argument(mux_service, name)


def test_engine_refusals_keep_their_status_code(mux_service):
    errors.test_prompt_longer_than_the_context(mux_service)  # refused by the engine


def test_bad_requests_do_not_disturb_a_running_one(mux_service):
    errors.test_bad_requests_do_not_disturb_a_running_one(mux_service)


def test_cancelled_stream_frees_its_kv_blocks(mux_service):
    generation.test_cancelled_stream_frees_its_kv_blocks(mux_service)


def test_deadline_exceeded_and_the_request_leaves_the_batch(mux_service):
    serving.test_deadline_exceeded_and_the_request_leaves_the_batch(mux_service)


def test_a_request_after_an_error_still_runs(mux_service):
    with pytest.raises(grpc.RpcError) as err:
        mux_service.stub.Generate(pb.GenerateRequest(text=""), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    out = mux_service.stub.Generate(generation.text_request("Hello", max_tokens=3,
                                                            ignore_eos=True), timeout=60)
    assert len(out.token_ids) == 3
