"""The MLflow steps: one module per workflow step, each ``run_<step>(cfg, *, experiment=None, nested=False)``.

Each opens (or joins) one MLflow run, logs the step's config as params, and calls into the domain
packages below it; the ``kt`` command and the MLproject entry points are thin calls into these.
"""
