"""Report: what the jobs wrote, read back and shown.

``runs`` loads training runs and score sets (with the dataset's ground
truth), ``figures`` draws them, ``page`` writes ``report.md`` and
``report.html``. The last step of the flow; it reads outputs only.
"""
