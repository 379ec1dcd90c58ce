"""Offline quantization jobs on Hugging Face models (the `tpserve lite` commands).

Entry points: ``calibrate.calibrate`` (activation and KV statistics),
``kv_qparams.compute_kv_qparams`` (int8 KV-cache scales from them),
``awq.auto_awq`` (4-bit AWQ or round-to-nearest checkpoint, with a held-out
perplexity check in ``awq_eval``), ``ppl.perplexity`` /
``ppl.hf_perplexity`` (quality checks). Formats and numerics live in
``pack``, ``quantize``, ``observers`` and ``awq_search``.
"""
