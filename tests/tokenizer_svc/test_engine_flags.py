"""python -m tokenizer_svc: flag values out of range are usage errors (exit 2)."""

import pytest

from tokenizer_svc.__main__ import parse_args


@pytest.mark.parametrize("flags", [["--max-num-seqs", "0"], ["--kernels", "bogus"],
                                   ["--block-size", "0"], ["--max-model-len", "1"],
                                   ["--grace-period", "-5"], ["--stall-timeout", "0"],
                                   ["--gpu-memory-utilization", "1.5"],
                                   ["--kv-cache-gib", "0"], ["--batch-wait-ms", "-1"],
                                   ["--metrics-port", "70000"], ["--stall-timeout", "nan"],
                                   ["--dtype", "bf16"], ["--device", "gpu"],
                                   ["--device", "cuda:x"]])
def test_a_bad_value_is_a_usage_error(capsys, flags):
    with pytest.raises(SystemExit) as info:
        parse_args(["--listen", "unix:///tmp/e.sock", *flags])
    assert info.value.code == 2
    assert "tokenizer_svc: error:" in capsys.readouterr().err


def test_good_values_pass():
    cfg = parse_args(["--listen", "unix:///tmp/e.sock", "--grace-period", "0",
                      "--metrics-port", "0", "--gpu-memory-utilization", "1",
                      "--dtype", "bfloat16", "--device", "cuda:1"])
    assert cfg.grace_period == 0 and cfg.metrics_port == 0
    assert (cfg.model.dtype, cfg.model.device) == ("bfloat16", "cuda:1")
