"""The keeper: warm once, then keep a selection resident for as long as an engine runs.

``model`` (one kept model: plan, open files, held mappings, locks, counters) <- ``keeper``
(the loop: check, re-warm, hold, refresh, lock, back off) -> ``http`` (/metrics, /ready,
/status).  docs/keep.md says why each step is there.
"""
