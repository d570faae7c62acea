"""``python -m bench``: Tandem sync vs async against Hugging Face continuous batching.

- :mod:`bench.analysis`: pure arithmetic (interval unions, idle gaps, bandwidth floor);
- :mod:`bench.workload`: the workload, its prompts and the model's shape;
- :mod:`bench.device`: the device probe, bandwidth measurement and the NVML sampler;
- :mod:`bench.tandem_run`: one Tandem engine per mode, driven over its internal gRPC API;
- :mod:`bench.hf_baseline`: Transformers' ``generate_batch`` in a subprocess per mode;
- :mod:`bench.report`: the table, ``bench.json`` and ``bench.png``.
"""
