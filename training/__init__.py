"""MiniCloud's training engine.

Runs on its own: ``python -m training run SPEC.json``. It never imports Django; the portal talks to it only through
the spec file (JSON in) and JSON-lines events on stdout (see docs/training-spec.md). Importing this package (or
``training.spec``, ``training.records``, ``training.token_cache``, ``training.demo_data``) does not import torch,
so the portal may use them for validation, statistics and cache management.
"""
