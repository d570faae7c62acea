"""``python -m bench``: Tandem sync vs async (and through its gateway) against Hugging Face
continuous batching.

- :mod:`bench.analysis`: pure arithmetic (interval unions, idle gaps, bandwidth floor);
- :mod:`bench.workload`: the workload, its prompts and the model's shape;
- :mod:`bench.device`: the device probe, bandwidth measurement and the NVML sampler;
- :mod:`bench.services`: the engine and gateway subprocesses, SERVING on enter;
- :mod:`bench.tandem_run`: one Tandem mode: its engine driven over the internal gRPC API, or
  through a gateway over the public one;
- :mod:`bench.hf_baseline`: Transformers' ``generate_batch`` in a subprocess per mode;
- :mod:`bench.report`: the table, ``bench.json`` and ``bench.png``.
"""
