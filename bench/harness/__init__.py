"""The harness: what turns cells into records and records into results. ``runner`` (one cell ->
record), ``launch`` (executors), ``sweep``, ``records``, ``tune`` (Optuna), ``leaderboard``,
``report`` and ``figures``.

May import: the loops and everything below them; never the studies or the CLI.
"""
