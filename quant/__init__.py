"""Offline quantization jobs on Hugging Face models (the `tpserve lite` commands).

Entry points: ``calibrate.calibrate`` (activation and KV statistics),
``kv_qparams.compute_kv_qparams`` (int8 KV-cache scales from them),
``awq.auto_awq`` (4-bit AWQ checkpoint), ``ppl.perplexity`` /
``ppl.hf_perplexity`` (quality checks). Formats and numerics live in
``pack``, ``quantize``, ``observers`` and ``awq_search``.
"""
