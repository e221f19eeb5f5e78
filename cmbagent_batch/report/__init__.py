"""The run report, ``RUN_DIR/report.html``: one self-contained page that shows a run at a glance.

``gather.py`` reads the run directory once (run.json, every journal line, the ledger); ``job.py`` adds what
only the job spec knows (each task's kind and matrix values, the DAG); ``reasons.py`` keeps why each task
of a run ran; one module draws each section (``summary.py``, ``timeline.py``, ``tasks.py``, ``costs.py``,
``graph.py``) and ``page.py`` puts the page together and writes it. ``refresh.py`` keeps it up to date
while a run goes on.
"""
