"""``report.html``: one self-contained file (autoescaped, strict CSP, no network requests)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

import jinja2

from ..evaluators.sessions import rebuild_sessions
from ..store import RunStore
from ..tracing.local import spans_dataframe

REPORT_FILE = "report.html"
EMBEDDED_NOTICE = (
    "This run used the embedded SmolLM2-135M model. It checks that the pipeline works end to end; "
    "its answers and its judgements are not to be trusted."
)


def _environment() -> jinja2.Environment:
    loader = jinja2.FunctionLoader(
        lambda name: resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")
    )
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.0f}%"
    env.filters["heat"] = _heat
    return env


def _heat(rate: Optional[float]) -> str:
    """A background colour for a failure rate: white at 0, red at 1 (grey when nothing was judged)."""
    if rate is None:
        return "background:#eee"
    light = int(255 - 150 * rate)
    return f"background:rgb(255,{light},{light})"


def session_views(store: RunStore) -> list[dict[str, Any]]:
    """Every latest-attempt session with its transcript (from the trace store), judgements and usage."""
    run = store.run() or {}
    transcripts = {t.session_id: t for t in rebuild_sessions(spans_dataframe(store, f"{run.get('run_id', '')}/"))}
    judgements: dict[str, list] = {}
    for j in store.judgements():
        judgements.setdefault(j.session_id, []).append(j)
    usage = store.usage_by_session()
    views = []
    for s in store.latest_sessions():
        transcript = transcripts.get(s["session_id"])
        js = sorted(judgements.get(s["session_id"], []), key=lambda j: (j.judge, j.judge_sample))
        failed = any(j.status == "ok" and not j.passed for j in js)
        views.append({
            **s,
            "messages": transcript.messages if transcript else [],
            "judgements": js,
            "usage": usage.get(s["session_id"], {}),
            "failed": failed,
            "rank": 0 if s["status"] == "errored" else (1 if failed else 2),
        })
    views.sort(key=lambda v: v["rank"])
    return views


def render_report(store: RunStore, summary: dict[str, Any], embedded: bool) -> str:
    template = _environment().get_template("report.html.j2")
    rows = {
        key: list(dict.fromkeys(name for dim in summary["dimensions"].values() for name in dim[key]))
        for key in ("by_variant", "by_persona", "by_topic")
    }
    return template.render(
        summary=summary,
        breakdown_rows=rows,
        sessions=session_views(store),
        embedded_notice=EMBEDDED_NOTICE if embedded else None,
    )


def write_report(store: RunStore, summary: dict[str, Any], run_dir: Path, embedded: bool) -> Path:
    path = Path(run_dir) / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report(store, summary, embedded), encoding="utf-8")
    tmp.replace(path)
    return path
