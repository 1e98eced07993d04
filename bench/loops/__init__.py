"""The loops: what one run does. ``config`` (the typed run config), ``train`` (the online LM
loop), ``linear`` (the log-linear task), ``reward_model`` (Bradley-Terry reward models),
``evaluate`` (held-out mixtures), ``capability`` (lm-eval), ``callbacks`` (``OnEval``, ``StopRun``).

May import: ``bench.core``, ``methods``, ``tasks``; never the harness, the studies or the CLI.
"""
