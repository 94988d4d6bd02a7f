"""``report.html``: one self-contained file (autoescaped, strict CSP, no network requests).

The first screen answers whether a variant beats the baseline; heatmaps show where the tutor fails,
each cell linking to its sessions; sessions are grouped by pair key so the baseline's and a
variant's sessions of the same topic, persona and repeat sit side by side. One small script (allowed
by its hash in the CSP, never ``'unsafe-inline'``) opens linked sections and filters the sessions;
without it every link and section still works.

Large runs (more than ``LAZY_THRESHOLD`` sessions) do not put every transcript into the page: the
sessions go into one ``<script type="application/json">`` block (``<``, ``>`` and ``&`` written as
``\\u003c``, ``\\u003e``, ``\\u0026``, so no model text can close it) and the script renders a page of
pair groups at a time, each group's transcripts only when it is opened, with ``textContent``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import jinja2
from markupsafe import Markup

from ..evaluators.builtin import SIMULATOR_JUDGES
from ..evaluators.sessions import rebuild_sessions
from ..records import Message
from ..store import RunStore
from ..tracing.local import spans_dataframe
from . import plots
from .outcomes import Verdict, verdicts

REPORT_FILE = "report.html"
EMBEDDED_NOTICE = (
    "This run used the embedded SmolLM2-135M model. It checks that the pipeline works end to end; "
    "its answers and its judgements are not to be trusted."
)
BREAKDOWN_ATTR = {"by_persona": "persona", "by_topic": "topic", "by_variant": "variant"}
# Drill-down order inside a cell: failures first, then judgements without a verdict, then passes.
OUTCOME_ORDER = {"fail": 0, "error": 1, "skipped": 2, "pass": 3}
# Above this many passed sessions a cell links to the filtered session list instead of listing each one.
MAX_PASSED_LINKS = 50
# Failed, errored and skipped judgements listed per cell with their explanation; the rest by a filter link.
MAX_LISTED = 100
# Above this many sessions the session list is rendered by the script from embedded JSON, a page at a time.
LAZY_THRESHOLD = 300
# In such a report, fewer judgements are listed per cell (the filtered session list has them all).
MAX_LISTED_LAZY = 20
# Pair groups per page of the lazily rendered session list.
PAGE_SIZE = 25
SESSION_DATA_ID = "session-data"


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def environment() -> jinja2.Environment:
    """The report's jinja2 environment: autoescaping on, undefined names are errors."""
    loader = jinja2.FunctionLoader(_asset)
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.0f}%"
    env.filters["points"] = lambda v: "–" if v is None else f"{100 * v:+.0f}"
    env.filters["pval"] = lambda v: "–" if v is None else ("< 0.001" if v < 0.001 else f"{v:.3f}")
    env.filters["heat"] = _heat
    return env


def assets() -> dict[str, Any]:
    """The inline stylesheet and script, and a Content-Security-Policy that allows exactly that script."""
    script = _asset("report.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{digest}'; "
           "base-uri 'none'; form-action 'none'")
    # Our own static files, not data: safe to insert unescaped (the hash must match the script byte for byte).
    return {"css": Markup(_asset("report.css")), "script": Markup(script), "csp": Markup(csp)}


def _heat(rate: Optional[float]) -> str:
    """A background colour for a failure rate: white at 0, red at 1 (grey when nothing was judged)."""
    if rate is None:
        return "background:#eee"
    light = int(255 - 150 * rate)
    return f"background:rgb(255,{light},{light})"


def _outcome(j) -> str:
    if j.status == "ok":
        return "pass" if j.passed else "fail"
    return j.status


def session_views(store: RunStore, prefix: str = "s", baseline: Optional[str] = None) -> list[dict[str, Any]]:
    """Every latest-attempt session with its transcript (from the trace store), judgements and usage.

    ``anchor`` is the session's id in the page (``<prefix>-<n>``); ``by_dim`` maps each dimension to
    its first judgement and ``outcomes`` to pass, fail, error or skipped; ``labels`` is what the
    filters match (``dim:label`` and ``dim:@outcome`` tokens).
    """
    # The run's file holds only its own spans: every session, simulated ("<run_id>/...") or imported
    # from a trace store by ``simbench judge`` (which keeps the store's session ids).
    transcripts = {t.session_id: t for t in rebuild_sessions(spans_dataframe(store))}
    judgements: dict[str, list] = {}
    for j in store.judgements():
        judgements.setdefault(j.session_id, []).append(j)
    chosen: dict[str, dict[str, Verdict]] = {}
    for (session_id, dim), v in sorted(verdicts(store).items()):
        chosen.setdefault(session_id, {})[dim] = v
    turn_verdicts: dict[str, dict[int, list]] = {}
    for j in store.turn_judgements():
        if j.judge_sample == 0:
            turn_verdicts.setdefault(j.session_id, {}).setdefault(j.turn, []).append(j)
    usage = store.usage_by_session()
    imported = store.imported_sessions()
    views = []
    for n, s in enumerate(store.latest_sessions(), start=1):
        transcript = transcripts.get(s["session_id"])
        js = sorted(judgements.get(s["session_id"], []), key=lambda j: (j.judge, j.judge_sample))
        by_dim = chosen.get(s["session_id"], {})  # the verdict: the majority of the judgement samples
        outcomes = {dim: _outcome(j) for dim, j in by_dim.items()}
        failed = "fail" in outcomes.values()
        tokens = [f"{dim}:@{o}" for dim, o in outcomes.items()]
        tokens += [f"{dim}:{j.label}" for dim, j in by_dim.items() if j.status == "ok" and j.label]
        tokens += [f"{dim}:@unstable" for dim, j in by_dim.items() if j.unstable]
        if s["status"] != "completed":
            tokens.append(f"_:@{s['status']}")
        simulator_error = any(outcomes.get(name) == "fail" for name in SIMULATOR_JUDGES)
        if simulator_error:
            tokens.append("_:@simulator_error")
        views.append({
            **s,
            "anchor": f"{prefix}-{n}",
            "baseline": s["variant"] == baseline,
            "messages": transcript.messages if transcript else [],
            "turn_verdicts": turn_verdicts.get(s["session_id"], {}),
            "judgements": js,
            "by_dim": by_dim,
            "outcomes": outcomes,
            "labels": " ".join(t.replace(" ", "_") for t in tokens),
            "usage": usage.get(s["session_id"], {}),
            "imported": imported.get(s["session_id"]),  # {source, source_id, line} of an imported session
            "failed": failed,
            "simulator_error": simulator_error,
            "rank": 0 if s["status"] == "errored" else (1 if failed else 2),
        })
    return views


def pair_groups(views: list[dict[str, Any]], variants: list[str], prefix: str = "p") -> list[dict[str, Any]]:
    """Sessions grouped by pair key (topic, persona, repeat), variants in matrix order (baseline first).

    Groups in which any session failed a judge or errored come first; otherwise plan order.
    """
    order = {v: i for i, v in enumerate(variants)}
    groups: dict[tuple, list[dict]] = {}
    for v in views:
        groups.setdefault((v["topic"], v["persona"], v["repeat"]), []).append(v)
    out = []
    for i, ((topic, persona, repeat), members) in enumerate(groups.items(), start=1):
        members.sort(key=lambda v: order.get(v["variant"], len(order)))
        failed = sum(1 for v in members if v["failed"])
        errored = sum(1 for v in members if v["status"] == "errored")
        out.append({"anchor": f"{prefix}-{i}", "topic": topic, "persona": persona, "repeat": repeat,
                    "sessions": members, "failed": failed, "errored": errored, "bad": failed + errored})
    out.sort(key=lambda g: g["bad"] == 0)
    return out


def drill_lists(views: list[dict[str, Any]], rows: dict[str, list[str]], dimensions: list[str]) -> dict[str, Any]:
    """For every heatmap cell (breakdown, name, dimension): its anchor and its judged sessions, failures first."""
    buckets: dict[tuple, list] = defaultdict(list)
    for v in views:
        if v["status"] != "completed":
            continue
        for dim, outcome in v["outcomes"].items():
            for key, attr in BREAKDOWN_ATTR.items():
                buckets[(key, v[attr], dim)].append((outcome, v))
    out: dict[str, Any] = {}
    for key, names in rows.items():
        for i, name in enumerate(names):
            for k, dim in enumerate(dimensions):
                items = sorted(buckets.get((key, name, dim), []), key=lambda item: OUTCOME_ORDER.get(item[0], 9))
                out[f"{key}\0{name}\0{dim}"] = {
                    "anchor": f"d-{key[3:]}-{i}-{k}", "key": key[3:], "name": name, "dim": dim,
                    "flagged": [(o, v) for o, v in items if o != "pass"],
                    "passed": [v for o, v in items if o == "pass"],
                }
    return out


def comparison_rows(comparisons: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (variant, dimension) comparison with its forest-plot geometry."""
    return [
        {"variant": variant, "dim": dim, "c": c, "plot": plots.diff_plot(c)}
        for variant, per_dim in comparisons.items()
        for dim, c in per_dim.items()
    ]


def breakdown_rows(summary: dict[str, Any]) -> dict[str, list[str]]:
    """The row names of each heatmap, in first-seen order (variants in matrix order)."""
    rows = {
        key: list(dict.fromkeys(name for dim in summary["dimensions"].values() for name in dim[key]))
        for key in BREAKDOWN_ATTR
    }
    variants = summary.get("variants") or []
    rows["by_variant"] = [v for v in variants if v in rows["by_variant"]] + [v for v in rows["by_variant"] if v not in variants]
    return rows


def script_json(value: Any) -> Markup:
    """JSON that is safe inside ``<script type="application/json">``: no ``<``, ``>`` or ``&`` survives, so
    neither ``</script>`` nor ``<!--`` in model text can end the block. ``JSON.parse`` reads it back unchanged."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    # U+2028 and U+2029 are valid in JSON and in a script's text; escaped anyway for old parsers.
    return Markup(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _usage_row(role: str, u: dict[str, Any]) -> list:
    return [role, u.get("calls") or 0, u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0,
            round(u.get("latency_s") or 0, 3)]


def _message_row(m: Message) -> list:
    """[role, text], and the reply's tool calls as [name, arguments, result] each when it has any."""
    row: list = [m.role, m.content]
    if m.tool_calls:
        row.append([[t.name, t.arguments, t.result] for t in m.tool_calls])
    return row


def session_data(views: list[dict[str, Any]], pairs: list[dict[str, Any]], dimensions: list[str],
                 page_size: int = PAGE_SIZE) -> dict[str, Any]:
    """The sessions of a large report for its script: pair groups in display order, each session with
    its transcript, judgements, usage and filter tokens. Names of variants, topics and personas are
    listed once and referred to by index. report.js documents the fields it reads."""
    names: dict[str, dict[str, int]] = {"variant": {}, "topic": {}, "persona": {}}

    def ref(kind: str, name: str) -> int:
        return names[kind].setdefault(name, len(names[kind]))

    index = {v["anchor"]: i for i, v in enumerate(views)}
    sessions = []
    for v in views:
        sessions.append({
            "a": v["anchor"], "v": ref("variant", v["variant"]), "t": ref("topic", v["topic"]),
            "p": ref("persona", v["persona"]), "r": v["repeat"], "b": 1 if v["baseline"] else 0,
            "st": v["status"], "f": 1 if v["failed"] else 0, "n": v["turns"] or 0,
            "id": v["session_id"] + (f" (imported: {v['imported']['source_id']}, line {v['imported']['line']})"
                                     if v["imported"] else ""),
            "sp": v["span_id"] or "", "stop": v["stop_reason"] or "", "err": v["error"] or "",
            "l": v["labels"],
            "o": [[dim, v["outcomes"][dim], (j.label if j.status == "ok" else j.status) + (" (unstable)" if j.unstable else "")]
                  for dim, j in v["by_dim"].items()],
            "u": [_usage_row(role, u) for role, u in v["usage"].items()],
            "m": [_message_row(m) for m in v["messages"]],
            "j": [[j.judge, j.judge_sample, ("pass" if j.passed else "fail") if j.status == "ok" else j.status,
                   j.label if j.status == "ok" else j.status, j.explanation or j.error or ""] for j in v["judgements"]],
        })
    groups = [{"a": g["anchor"], "t": ref("topic", g["topic"]), "p": ref("persona", g["persona"]), "r": g["repeat"],
               "fl": g["failed"], "er": g["errored"], "s": [index[s["anchor"]] for s in g["sessions"]]}
              for g in pairs]
    return {"version": 1, "page_size": page_size, "dimensions": dimensions,
            "names": {kind: list(n) for kind, n in names.items()}, "sessions": sessions, "groups": groups}


def render_report(store: RunStore, summary: dict[str, Any], embedded: bool, lazy: Optional[bool] = None) -> str:
    """The whole report as one HTML string.

    ``lazy``: embed the sessions as JSON and let the script render them a page at a time (None: when
    the run has more than ``LAZY_THRESHOLD`` sessions); otherwise every session is in the HTML.
    """
    template = environment().get_template("report.html.j2")
    rows = breakdown_rows(summary)
    dimensions = list(summary["dimensions"])
    variants = summary.get("variants") or rows["by_variant"]
    views = session_views(store, baseline=summary.get("baseline"))
    turns: dict[str, list[int]] = defaultdict(list)
    for v in views:
        if v["status"] == "completed":
            turns[v["variant"]].append(v["turns"] or 0)
    filters = {
        "variant": variants,
        "persona": rows["by_persona"] or sorted({v["persona"] for v in views}),
        "topic": rows["by_topic"] or sorted({v["topic"] for v in views}),
        "dim": dimensions,
        "label": sorted({j.label.replace(" ", "_") for v in views for j in v["by_dim"].values() if j.status == "ok" and j.label}),
    }
    pairs = pair_groups(views, variants)
    if lazy is None:
        lazy = len(views) > LAZY_THRESHOLD
    return template.render(
        summary=summary,
        breakdown_rows=rows,
        dimensions=dimensions,
        variants=variants,
        comparisons=comparison_rows(summary.get("comparisons") or {}),
        drills=drill_lists(views, rows, dimensions),
        pairs=[] if lazy else pairs,
        lazy=lazy,
        session_data=script_json(session_data(views, pairs, dimensions)) if lazy else None,
        session_data_id=SESSION_DATA_ID,
        page_size=PAGE_SIZE,
        sessions_total=len(views),
        rate_plot=plots.rate_plot(summary),
        turns_plot=plots.turns_plot(dict(turns), variants),
        filters=filters,
        max_passed_links=MAX_PASSED_LINKS,
        max_listed=MAX_LISTED_LAZY if lazy else MAX_LISTED,
        embedded_notice=EMBEDDED_NOTICE if embedded else None,
        anchors={v["session_id"]: v["anchor"] for v in views},
        **assets(),
    )


def write_report(store: RunStore, summary: dict[str, Any], run_dir: Path, embedded: bool,
                 lazy: Optional[bool] = None, path: Optional[Path] = None) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``path``); ``lazy`` as in ``render_report``."""
    path = Path(path) if path else Path(run_dir) / REPORT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(store, summary, embedded, lazy), encoding="utf-8")
    tmp.replace(path)
    return path
