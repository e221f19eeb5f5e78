"""The cost ledger: one entry per model call, journaled per rank, merged into a hash-chained file.

What a run uses, each from its module (this file imports nothing, so importing one module of the
package, e.g. the report, imports no other)::

    from cmbagent_batch.ledger.entry import make_entry      # the fields, checked
    from cmbagent_batch.ledger.journal import JournalWriter, next_call_id   # durable appends per rank
    from cmbagent_batch.ledger.costs import CallRecorder    # intent before each call, entry after it
    from cmbagent_batch.ledger.meter import SpendMeter      # spent so far, for budgets
    from cmbagent_batch.ledger.merge import merge           # journals -> RUN_DIR/ledger.jsonl

    with JournalWriter(run_dir, rank) as journal:
        journal.append(make_entry(id=next_call_id(run_id, rank), ...))
    manifest["ledger"] = merge(run_dir).manifest()

The offline commands (``cmbagent-batch ledger ...``, in ``cli/ledger.py``) read the files with
``reader.py``, which checks each chain as it reads (``check.FileCheck``); ``verify.py``, ``summary.py``,
``export.py``, ``reprice.py``, ``diff.py`` and ``report.py`` (with ``provenance.py``: the chains' status and
the price tables on the page) do one command's work each; ``chain.py`` is the hash chain and its line-by-line
check, ``check.py`` a file's chain against the end its run.json records and how what is wrong is worded,
``verdict.py`` what a check found, ``files.py`` the paths and fast file I/O, ``intents.py`` the calls
announced before they are sent and their pairing with results, ``money.py`` how an amount is shown and
summed.
Nothing here imports an LLM client.
"""
