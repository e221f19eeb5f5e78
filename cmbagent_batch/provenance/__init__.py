"""Provenance of a run as a Workflow Run RO-Crate (``cmbagent-batch export RUN_DIR --format ro-crate``).

``vocab.py`` holds the profiles and terms, ``graph.py`` the streaming JSON-LD writer, ``sources.py`` what
a run directory, its spec, plan and ledger say, ``files.py`` the data files (hashed, referenced or copied),
``actions.py`` one task's entities, and ``crate.py`` puts them together.
"""
