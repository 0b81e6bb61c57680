"""Orchestration: sweep files run stage by stage (``sweep``), how a stage is called
(``stages``), run reuse keyed by params and code (``reuse``, ``code_identity``), stage runs in
MLflow (``tracking``), run ownership (``owner``), the machine tag (``machine``), stand-in
stages (``simulate``) and dispatch to remote MLflow backends (``dispatch``).

It imports the library floors below it (``analysis``, ``decoding``, ``drafts``, ``data``,
``modeling``) and nothing imports it but ``scylla.commands``.
"""
