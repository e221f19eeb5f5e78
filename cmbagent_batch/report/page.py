"""The run report page: its sections put together into one self-contained HTML file, written atomically.

Inline CSS, inline SVG and one inline script (sorting, filtering and paging the tasks table); nothing is
fetched (a Content-Security-Policy says so to the browser too). Every figure carries an ``id`` and a
``data-value`` with its exact value. The script notes what it saw on ``<body>``: ``data-ready`` once it ran,
``data-errors`` (script errors) and ``data-resources`` (what the page loaded: none), for tests and checks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from cmbagent_batch.ledger.provenance import esc
from cmbagent_batch.ledger.report import _CSS, render_report
from cmbagent_batch.report.costs import render_costs
from cmbagent_batch.report.gather import Gathered, gather
from cmbagent_batch.report.graph import render_graph
from cmbagent_batch.report.job import JobView, load_job
from cmbagent_batch.report.reasons import Reasons
from cmbagent_batch.report.summary import render_summary, totals
from cmbagent_batch.report.tasks import costs_by_task, render_tasks, task_figures
from cmbagent_batch.report.timeline import critical_path, render_timeline, render_utilisation
from cmbagent_batch.rundir.atomic import write_atomic

REPORT = "report.html"  # RUN_DIR/report.html
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
_MORE_CSS = """
h3{font-size:14px;margin:8px 0 6px}.note{color:var(--muted);font-size:12px;margin:-4px 0 10px}
.chip{display:inline-flex;align-items:center;gap:4px;margin:2px 10px 2px 0;white-space:nowrap}
.chip i,.dot{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.chip i.crit{background:#fff;border:2px solid #111}.legend{margin:0 0 6px;font-size:12px}
rect.bar.crit,.node.crit rect{stroke:#111;stroke-width:1.6}rect.idle{fill:#c62828;opacity:.08}
.busy{fill:#2e7d32;fill-opacity:.18;stroke:#2e7d32;stroke-width:1.2}.gpu{fill:none;stroke:#7b1fa2;stroke-width:1.5}
.edge{fill:none;stroke:#9aa5b1}.edge.crit{stroke:#111;stroke-width:2}.node text{font-size:11px;fill:#fff}
tr.this td{font-weight:600}td.why{color:var(--muted);font-size:12px;min-width:10em}
pre.tail{margin:4px 0 0;white-space:pre-wrap;color:var(--fg);background:#fafbfc;padding:4px;font-size:11px}
.root{color:var(--fg);margin-top:2px}tr.total td{font-weight:600;border-top:2px solid var(--line)}
th[data-col]{cursor:pointer}.tools{display:flex;gap:12px;align-items:center;margin-bottom:6px}
.tools input{padding:4px 8px;border:1px solid var(--line);border-radius:4px;min-width:260px}
#task-pages button{margin:0 2px}.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:16px}
td.levelbar{width:50%}td.levelbar span{display:inline-block;height:10px}
"""
_SCRIPT = """
(function(){var b=document.body,errs=0;window.addEventListener('error',function(){errs++;b.dataset.errors=errs;});
var t=document.getElementById('tasks-table');if(t){var body=t.tBodies[0],rows=[].slice.call(body.rows),page=0,per=100,
shown=rows,f=document.getElementById('task-filter'),nav=document.getElementById('task-pages'),dir={};
function draw(){body.textContent='';var n=Math.max(1,Math.ceil(shown.length/per));if(page>=n)page=n-1;
shown.slice(page*per,page*per+per).forEach(function(r){body.appendChild(r);});nav.textContent='';
var s=document.createElement('span');s.textContent=shown.length+' rows, page '+(page+1)+' of '+n+' ';nav.appendChild(s);
[['\\u2039',-1],['\\u203a',1]].forEach(function(p){var x=document.createElement('button');x.textContent=p[0];
x.onclick=function(){page=Math.min(n-1,Math.max(0,page+p[1]));draw();};nav.appendChild(x);});}
f.addEventListener('input',function(){var q=f.value.toLowerCase();page=0;shown=rows.filter(function(r){
return r.textContent.toLowerCase().indexOf(q)>=0;});draw();});
[].forEach.call(t.tHead.rows[0].cells,function(th){th.addEventListener('click',function(){var c=+th.dataset.col,
d=dir[c]=-(dir[c]||-1);function key(r){var x=r.cells[c];return x.dataset.sort!==undefined?+x.dataset.sort:x.textContent;}
shown.sort(function(a,b){var p=key(a),q=key(b);return (p<q?-1:p>q?1:0)*d;});page=0;draw();});});draw();}
b.dataset.resources=performance.getEntriesByType('resource').length;b.dataset.errors=errs;b.dataset.ready='1';})();
"""


def ledger_page_name(out: str) -> str:
    """Where the ledger's report goes beside ``out``: ``report.html`` -> ``report.ledger.html``."""
    root, ext = os.path.splitext(os.path.basename(out))
    return f"{root}.ledger{ext or '.html'}"


def render(g: Gathered, job: JobView, ledger_page: str | None) -> str:
    """The page of the gathered run ``g``."""
    run = list(g.this_run())
    t = totals(g)
    kinds = job.kinds()
    path = critical_path(g, run, job.dag)
    figures = task_figures(g, run)
    costs = costs_by_task(g)
    reasons = Reasons(g.run_dir, g.run_id)
    title = f"Run report: {g.manifest.get('job')}"
    written = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(g.now))
    live = " (the run is going on: this page is refreshed every 30 s or so)" if g.manifest.get("status") == "running" \
        and not g.runner_gone else ""
    notes = f'<p class="note" id="job-note">{esc(job.note)}</p>' if job.note else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}{_MORE_CSS}</style></head>\n<body>"
        f'<h1 id="title">{esc(title)}</h1><p class="note">Written {esc(written)}{esc(live)}; run {esc(g.run_id)}.</p>'
        + notes + render_summary(g, t) + render_timeline(g, run, kinds, path) + render_utilisation(g, run, t)
        + render_tasks(g, run, kinds, figures, costs, reasons) + render_costs(g, job, figures, costs, ledger_page)
        + render_graph(job.dag, g.state, path, job.note)
        + f"<script>{_SCRIPT}</script></body></html>\n")


def write_report(run_dir: str, out: str | None = None, job: JobView | None = None,
                 warn: Callable[[str], None] | None = None) -> tuple[str, Gathered]:
    """Write the report of ``run_dir`` to ``out`` (default RUN_DIR/report.html), and the ledger's report
    beside it when the job has a ledger; ``job``: the run's own spec and DAG (else read from the spec
    run.json names). Returns the path written and what was gathered."""
    say = warn or (lambda message: None)
    out = out or os.path.join(run_dir, REPORT)
    g = gather(run_dir, say)
    ledger_page = None
    if g.entries:
        ledger_page = ledger_page_name(out)
        budget = g.manifest.get("budget_usd")
        page = render_report(g.entries, title=f"Cost ledger: {g.manifest.get('job')}",
                             budget_usd=float(budget) if isinstance(budget, (int, float)) else None,
                             chains=g.chains or None)
        write_atomic(os.path.join(os.path.dirname(os.path.abspath(out)), ledger_page), page.encode("utf-8"))
    page = render(g, job if job is not None else load_job(g.manifest, say), ledger_page)
    write_atomic(out, page.encode("utf-8"))
    return out, g
