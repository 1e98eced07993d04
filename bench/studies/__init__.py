"""Studies built on the harness: the radius-coverage study (``coverage``) and ``bench perf``.

May import: the harness and everything below it; never the CLI.
"""
