"""A/B experiments: an alias whose requests go to weighted, sticky arms (adapter versions), with shadow traffic,
outcomes, statistics and guardrails.

    spec.py     the definition (pydantic at the edge, a frozen Experiment inside) and its static checks
    assign.py   unit key -> bucket -> arm: the documented, pinned assignment
    persist.py  ExperimentStore: versioned, atomic JSON beside the adapter store, and its change mark
    catalog.py  the live set of experiments in an ingress replica, kept in step with the store
    ids.py      signed response ids that outcomes (POST /v1/feedback) refer to
    shadow.py   how a shadow row's answer is compared with the primary's
    stats.py    mergeable per-arm counts; report.py the statistics (scipy.stats)
    ledger.py   ExperimentLedger: the Ray actor that sums every ingress replica's counts, dedupes feedback and
                applies guardrails (auto-rollback)
"""
