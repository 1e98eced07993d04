"""Plumbing, used by tasks and loops alike: LM sampling and sequence log-probs (``lm``), cached
artifacts and locks (``artifacts``), the reference-data cache (``refcache``), the generic registry
(``registry``) and resource readings (``resources``).

May import: the standard library, torch, transformers and other third-party libraries; never the
rest of bench, ``methods`` or ``tasks``.
"""
