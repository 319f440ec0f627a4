"""OpenAI-compatible serving: ``rlhfkit serve`` and :func:`rlhfkit.serve.server.start_background`.

- :mod:`rlhfkit.serve.server`: the command (``Config``, ``main``), the FastAPI app
  (``create_app``) and ``start_background`` for tests, judges and arenas.
- :mod:`rlhfkit.serve.routes`: the routers (models and health, chat completions, completions).
- :mod:`rlhfkit.serve.engine`: the worker thread that owns the model and batches requests.
- :mod:`rlhfkit.serve.protocol`: request schemas, parameter checks, errors, response bodies.

See docs/serve.md.
"""
