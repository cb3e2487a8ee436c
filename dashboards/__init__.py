"""Dashboards over the fixed metric namespace of ``raymoe.metrics``: a wandb workspace builder and a local report.

``panels.yaml`` holds the layout; ``workspace.py`` and ``render_local.py`` are also runnable as scripts.
"""
