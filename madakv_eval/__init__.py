"""Evaluation tooling for madakv-vllm, kept out of the product package: the accuracy proxy's
synthetic tasks (``proxy_tasks``), the MileBench runner (``milebench``), tiny local models
(``tiny_models``), prompt helpers (``prompts``) and a ``vllm serve`` runner (``serve``). Used by
the tests, ``scripts/`` and the README demo from a checkout of the repository; its dependencies
are the ``eval`` extra. ``pip install madakv-vllm`` does not carry it."""
