"""Evaluation: lm-eval tasks declared as data, and the harness that runs them on an in-memory model.

- ``lm_eval_tasks/``: the task YAMLs (lm-eval's own format; prompts and metrics of its built-ins).
- ``tasks``: the registry read from those YAMLs, torch-free, for the experiment schema and the report.
- ``overlay``: pointing the YAMLs at a local Parquet mirror instead of the hub.
- ``harness``: :func:`evaluate_tasks` and :func:`evaluate` (tasks plus the C4 loss of ``core.loss``).
- ``paired``: per-question records of an evaluation, and the paired difference of two on the same questions.
"""
