"""Ray Serve application of the inference engine: OpenAI-compatible HTTP API (see :mod:`raymoe.actors.serve.app`).

``python -m raymoe.jobs.serve model_path=<dir>`` runs it; ``serve run conf/serve_app.yaml`` (or ``serve deploy``)
deploys it from a Serve config through :func:`raymoe.actors.serve.app.build_app`.
"""
