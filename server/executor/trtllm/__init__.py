"""The GPU backends on TensorRT-LLM 1.2.1; ``tensorrt_llm`` is imported only when one opens.

- ``trtllm``: a built engine under ``tensorrt_llm.bindings.executor.Executor`` (``open``,
  ``executor``; draft-target over two engines in ``spec``).
- ``trtllm-llmapi``: a Hugging Face checkpoint under ``tensorrt_llm.LLM`` on the PyTorch
  backend (``llmapi``).

``base`` holds what the executors share (outbox, poll, stats, shutdown); ``request``, ``stream``
and ``stats`` map between our boundary types and TensorRT-LLM's; ``config`` is the one config.
"""
