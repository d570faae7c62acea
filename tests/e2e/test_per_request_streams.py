"""The gateway with an engine stream per request (``--engine-streams per-request``, not the
default): clients see exactly what the default, one multiplexed GenerateMany stream per
engine, gives them: the same tokens, errors, cancellation, deadlines and refusals."""

from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tests.e2e import test_errors as errors
from tests.e2e import test_generation as generation
from tests.e2e import test_serving as serving

pytestmark = pytest.mark.e2e


def test_outputs_equal_those_of_the_multiplexed_stream(per_request_service, async_results):
    # all at once, as async_results were sent through the multiplexed stream
    got = generation.run_staggered(per_request_service, generation.greedy_requests(), gap=0.0)
    for (a_text, a_ids, a_last), (p_text, p_ids, p_last) in zip(async_results, got,
                                                                strict=True):
        assert (p_ids, p_text) == (a_ids, a_text)  # and so equal to HF generate()
        assert p_last.finish_reason == a_last.finish_reason
        assert p_last.usage.completion_tokens == a_last.usage.completion_tokens
        assert p_last.usage.prompt_tokens == a_last.usage.prompt_tokens
    unary = per_request_service.stub.Generate(generation.greedy_requests()[0], timeout=120)
    assert (unary.text, list(unary.token_ids)) == async_results[0][:2]


@pytest.mark.parametrize("name", list(errors.CASES))
def test_bad_input_is_invalid_argument(per_request_service, name):
    errors.test_bad_input_is_invalid_argument(per_request_service, name)


def test_engine_refusals_keep_their_status_code(per_request_service):
    errors.test_prompt_longer_than_the_context(per_request_service)  # refused by the engine


def test_bad_requests_do_not_disturb_a_running_one(per_request_service):
    errors.test_bad_requests_do_not_disturb_a_running_one(per_request_service)


def test_cancelled_stream_frees_its_kv_blocks(per_request_service):
    generation.test_cancelled_stream_frees_its_kv_blocks(per_request_service)


def test_deadline_exceeded_and_the_request_leaves_the_batch(per_request_service):
    serving.test_deadline_exceeded_and_the_request_leaves_the_batch(per_request_service)


def test_a_request_after_an_error_still_runs(per_request_service):
    with pytest.raises(grpc.RpcError) as err:
        per_request_service.stub.Generate(pb.GenerateRequest(text=""), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    out = per_request_service.stub.Generate(
        generation.text_request("Hello", max_tokens=3, ignore_eos=True), timeout=60)
    assert len(out.token_ids) == 3
