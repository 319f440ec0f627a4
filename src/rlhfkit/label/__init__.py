"""Human preference collection: the ``rlhfkit label`` web app (see docs/label.md).

``db`` tables and engine · ``service`` users, queue, judgments · ``stats`` agreement, alpha,
position bias, throughput · ``importer`` JSONL pairs in · ``export`` preference pairs out ·
``app`` pages and JSON API · ``commands`` the CLI. Labelling by an AI judge: ``ai_label`` (the
``rlhfkit ai-label`` command) and ``verdicts`` (a judge's verdict and its soft label).
"""
