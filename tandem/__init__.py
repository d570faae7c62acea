"""Tandem's shared core: what two processes both need (slot layout, link messages,
model resolution) and the generated protobuf modules (``tandem.v1``,
``tandem.internal.v1``). Process packages import this, never each other."""

# every process logs lines alike: time, level, logger, message
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# what the worker's --dtype and --kernels accept, checked by the engine too before it starts one
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "triton", "torch")

# SamplingParams.logit_bias: the most ids a request may bias (what a slot row holds), and
# the largest bias either way
MAX_LOGIT_BIAS = 64
MAX_ABS_LOGIT_BIAS = 100
