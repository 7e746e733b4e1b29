"""``vllm-mpk bench``: vLLM's time per output token and model-forward time, stock and with
``--model-impl mpk``, each engine in a fresh process.

- ``worker``: one engine (one model, one ``model_impl``) in this process; writes JSON rows.
- ``step_timer``: the worker extension vLLM loads into its GPU worker, timing each decode step.
- ``runner``: starts one worker process per engine and collects their rows.
- ``table``: the markdown table of RESULTS.md, from rows (pure functions, tested on the CPU).
- ``profiling``: ``--profile-dir``: each engine's largest batch under vLLM's torch profiler.
- ``trace``: per decode step, GPU time by group and idle gaps with the engine thread's activity,
  from such a trace (``--analyze-trace``; pure Python, tested on the CPU).
- ``vllm_tools``, ``vllm_tools_table``: ``vllm-mpk bench-vllm``, the same comparison by vLLM's own
  ``vllm bench latency`` and ``vllm bench serve``, and its section of RESULTS.md.
- ``offline_tokenizer``: a tokenizer made from a config.json alone, which vLLM's tools need.
"""
