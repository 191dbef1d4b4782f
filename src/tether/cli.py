"""`tether` command line: parses arguments, calls `tether.api`, prints tables. Nothing else lives here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

# plain click help (`-h`, `--task TEXT`): conventional, and readable when piped or at 80 columns
_SETTINGS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings=_SETTINGS,
                  help="Fine-tune language models without losing what they already knew.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=_SETTINGS,
                       help="Build the default probe pack and demo task data.")
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tether {version('tether')}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log what each step decides (INFO)."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Only results, warnings and errors: no progress lines or bars."),
) -> None:
    """Fine-tune language models without losing what they already knew."""
    from . import progress

    if verbose and quiet:
        _fail(ValueError("--verbose and --quiet: choose one"))
    root, before = logging.getLogger(), (logging.getLogger().level, progress.QUIET)
    if verbose or quiet:
        root.setLevel(logging.INFO if verbose else logging.ERROR)
    progress.QUIET = quiet
    if quiet:
        import transformers

        transformers.logging.set_verbosity_error()  # HF's Trainer then turns its progress bar off too
        transformers.logging.disable_progress_bar()

    def restore() -> None:  # for the next command in the same process (the Python API, tests)
        root.setLevel(before[0])
        progress.QUIET = before[1]
        if quiet:
            import transformers

            transformers.logging.set_verbosity_warning()
            transformers.logging.enable_progress_bar()

    ctx.call_on_close(restore)


def _console():
    """Rich output; piped into a file or a pager it is laid out 160 columns wide (rich's 80 cut probe names)."""
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


def _expected_errors() -> tuple[type[Exception], ...]:
    from .config import RecipeError
    from .data.builtin.sources import SourceMissing
    from .data.readers import DataError
    from .models import ModelNotAvailable

    return (DataError, RecipeError, ModelNotAvailable, SourceMissing, FileNotFoundError, KeyError, ValueError)


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Score one model (alias, directory or hub id)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of the forgetting report."),
    tuned: Optional[str] = typer.Option(None, "--tuned", help="Tuned model, or a PEFT adapter directory on --base."),
    suite: str = typer.Option("general", "--suite", "-s", help="Built-in suite name or a suite YAML."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N items of each probe."),
    threshold: float = typer.Option(0.05, help="Relative drop that counts as forgetting."),
    drift_threshold: float = typer.Option(0.25, help="The same for drift probes (they measure change, not ability)."),
    batch_size: int = typer.Option(16, help="Sequences per forward pass."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON here."),
) -> None:
    """Score a model on general probes, or compare a tuned model with its base (`--base M0 --tuned M1`)."""
    from . import api
    from .report.compare import render_comparison, render_flipped, render_results

    if (model is None) == (base is None and tuned is None) or (base is None) != (tuned is None):
        _fail(ValueError("give either --model, or both --base and --tuned"))
    try:
        if model is not None:
            results = api.evaluate(model, suite=suite, limit=limit, batch_size=batch_size, output=output)
            _console().print(render_results(results, title=f"{model} on {suite}"))
        else:
            report = api.compare(base, tuned, suite=suite, threshold=threshold, limit=limit,
                                 batch_size=batch_size, output=output, drift_threshold=drift_threshold)
            _console().print(render_comparison(report["comparisons"], threshold,
                                               title=f"Forgetting report: {tuned} vs {base}"))
            lost = render_flipped(report["comparisons"])
            if lost is not None:
                _console().print(lost)
            s = report["summary"]
            verdict = f"FORGETTING on {', '.join(s['forgot_probes'])}" if s["forgetting"] else "no forgetting detected"
            _console().print(f"[bold]{verdict}[/] (threshold {threshold:.0%} relative)")
    except _expected_errors() as e:
        _fail(e)
    if output:
        _console().print(f"wrote {output}")


@app.command("train")
def train_cmd(
    recipe: Optional[Path] = typer.Argument(
        None, help="Recipe YAML or a shipped recipe's name (distil-inputs, naive, ...); defaults: LoRA + 20% "
                   "replay with LwF on its rows + lr 1e-4 + guard."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Task training data (JSONL/JSON/CSV/Parquet)."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Held-out task data for the task score."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to fine-tune."),
    output_dir: Optional[str] = typer.Option(
        None, "--output-dir", "-o", help="Run directory (default: a new runs/<task>-<time>)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set lora.r=32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what the run directory holds."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue a killed or failed run from its newest checkpoint (its own recipe)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N items of each general probe."),
) -> None:
    """Fine-tune on a task while the guard watches the general probes."""
    from . import api

    if resume is not None and (recipe or task or eval_data or model or output_dir or overrides or overwrite or limit):
        _fail(ValueError("--resume continues a run with its own recipe: give RUN_DIR alone"))
    if resume is not None:
        try:
            result = api.resume(resume)
        except _expected_errors() as e:
            _fail(e)
        return _show_train(result)
    fields: dict = {}
    if task:
        fields.setdefault("task", {})["train"] = task
    if eval_data:
        fields.setdefault("task", {})["eval"] = eval_data
    if model:
        fields["model"] = {"name": model}
    if output_dir:
        fields["output_dir"] = output_dir
    if limit is not None:
        fields["general_limit"] = limit
    try:
        result = api.train(recipe, overrides=overrides, overwrite=overwrite, **fields)
    except _expected_errors() as e:
        _fail(e)
    _show_train(result)


def _show_train(result) -> None:
    from .probes.verdict import ProbeComparison
    from .report.compare import render_comparison, render_flipped

    s = result.summary
    if not s:  # a non-main process under torchrun: the main one reports
        return
    comps = [ProbeComparison(**p) for p in s["probes"]]
    title = f"General probes after {s['steps']} steps"
    _console().print(render_comparison(comps, s["general"]["threshold"], title=title))
    lost = render_flipped(comps)
    if lost is not None:
        _console().print(lost)
    task_s = s["task"]
    if task_s["base"] is not None:
        _console().print(f"task score: {task_s['base']:.3f} -> {task_s['final']:.3f}")
    if s.get("guard") and s["guard"]["stopped_at"] is not None:
        g = s["guard"]
        _console().print(f"guard stopped at step {g['stopped_at']}, restored step {g['restored_step']}")
    _console().print(f"run directory: {result.run_dir}")


@app.command("demo")
def demo_cmd(
    steps: int = typer.Option(40, help="Optimizer steps for each run."),
    output_dir: str = typer.Option("runs/demo", "--output-dir", "-o",
                                   help="Where both runs and demo.json go (replaced on every demo)."),
) -> None:
    """Naive full fine-tuning vs the default recipe on the embedded model: task gain and general change."""
    from .training.demo import run_demo

    try:
        run_demo(steps=steps, output_dir=output_dir)
    except _expected_errors() as e:
        _fail(e)


@app.command("continual")
def continual_cmd(
    sequence: Path = typer.Argument(..., help="Sequence YAML: tasks (name, train, eval), methods, training."),
    overrides: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set training.max_steps=30."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o",
                                             help="Run directory (default: a new runs/<task>-sequence-<time>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what the run directory holds."),
) -> None:
    """Train tasks one after another; accuracy matrix, backward/forward transfer, forgetting."""
    from . import api
    from .report.continual import render_continual

    try:
        result = api.continual(sequence, overrides=overrides, overwrite=overwrite,
                               **({"output_dir": output_dir} if output_dir else {}))
    except _expected_errors() as e:
        _fail(e)
    for table in render_continual(result):
        _console().print(table)


@app.command("interpolate")
def interpolate_cmd(
    base: str = typer.Option(..., "--base", help="Base model."),
    tuned: str = typer.Option(..., "--tuned", help="Fine-tuned model or PEFT adapter directory."),
    task_eval: Optional[Path] = typer.Option(None, "--task-eval", help="Held-out task data for the task score."),
    alphas: str = typer.Option("0,0.25,0.5,0.75,1", help="Comma-separated interpolation weights."),
    budget: float = typer.Option(0.05, help="Largest relative drop of any general probe."),
    suite: str = typer.Option("general", "--suite", "-s", help="Built-in suite name or a suite YAML."),
    limit: Optional[int] = typer.Option(None, help="Items per general probe."),
    output_dir: str = typer.Option("runs/interpolate", "--output-dir", "-o",
                                   help="Where the curve, the chosen model and the report go."),
) -> None:
    """WiSE-FT: interpolate base -> tuned, keep the best task score within the general budget."""
    from . import api

    try:
        result = api.interpolate(base, tuned, task_eval=task_eval, suite=suite, budget=budget, limit=limit,
                                 alphas=tuple(float(a) for a in alphas.split(",")), output_dir=output_dir)
    except _expected_errors() as e:
        _fail(e)
    _console().print(result.render_table())
    _console().print(f"chosen alpha {result.chosen_alpha:g}; saved to {Path(output_dir) / 'model'}")


@app.command("diagnose")
def diagnose_cmd(
    base: str = typer.Option(..., "--base", help="Base model."),
    tuned: str = typer.Option(..., "--tuned", help="Fine-tuned model or PEFT adapter directory."),
    prompts: Optional[Path] = typer.Option(
        None, help="JSONL of {prompt} records (default: the suite's drift prompts)."),
    suite: str = typer.Option("general", "--suite", "-s",
                              help="Built-in suite name or a suite YAML (its drift prompts)."),
    output_dir: str = typer.Option("runs/diagnose", "--output-dir", "-o", help="Where the report and plots go."),
) -> None:
    """Per-block weight change, hidden-state CKA and output KL; suggests what to freeze."""
    from . import api

    try:
        d = api.diagnose(base, tuned, prompts=prompts, suite=suite, output_dir=output_dir)
    except _expected_errors() as e:
        _fail(e)
    _console().print(d.render_table())
    _console().print(f"[bold]suggestion:[/] {d.suggestion}")
    if d.recipe:
        _console().print(d.recipe_yaml)


@app.command("recover")
def recover_cmd(
    model: str = typer.Option(..., "--model", "-m", help="The fine-tuned model that forgot (full model)."),
    base: str = typer.Option(..., "--base", help="Its original base: the reference for the general probes."),
    task: str = typer.Option(..., "--task", "-t", help="The task's training data."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Held-out task data, to report what was kept."),
    max_steps: int = typer.Option(100, help="Step limit."),
    replay_ratio: float = typer.Option(0.75, help="Share of each batch that is general replay."),
    budget: float = typer.Option(0.05, help="Stop once every probe is within this relative drop."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o",
                                             help="Run directory (default: a new runs/<task>-<time>)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what the run directory holds."),
) -> None:
    """Continue training a forgotten model on a replay-heavy mix until the general probes are back."""
    from . import api

    try:
        result = api.recover(model, base, task, eval_data=eval_data, max_steps=max_steps, replay_ratio=replay_ratio,
                             budget=budget, output_dir=output_dir, overrides=overrides, overwrite=overwrite)
    except _expected_errors() as e:
        _fail(e)
    rec = result.summary["recovery"]
    t = result.summary["task"]
    at = rec["recovered_at"]
    _console().print(f"recovered within budget at step {at}" if at else f"not within budget after {max_steps} steps")
    if t["base"] is not None:
        _console().print(f"task score {t['base']:.3f} -> {t['final']:.3f}")
    _console().print(f"run directory: {result.run_dir}")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (train, eval, continual, interpolate, diagnose)."),
    out: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default: RUN_DIR/report.html)."),
) -> None:
    """One self-contained HTML page (no server, no network) for a run directory."""
    from . import api

    try:
        path = api.report(run_dir, out)
    except _expected_errors() as e:
        _fail(e)
    _console().print(f"wrote {path}")


@data_app.command("build")
def data_build(
    name: str = typer.Option("general-v2", help="Probe pack to build."),
    task: list[str] = typer.Option(["fortune-topics"], help="Task data sets to build: fortune-topics (the demo), "
                                   "fortune-seq-a/b/c, foldoc-domain, stdlib-module."),
) -> None:
    """Build the default probe pack (and demo task data) into the cache, from packaged sources."""
    from rich.table import Table

    from . import api
    from .data.builtin.pack import pack_summary

    try:
        paths = api.build_data(name, tuple(task))
    except _expected_errors() as e:
        _fail(e)
    table = Table(title=f"{name}: {paths[name]}")
    for col in ("file", "kind", "items", "sources"):
        table.add_column(col)
    for row in pack_summary(paths[name]):
        table.add_row(str(row["file"]), str(row["kind"]), str(row["items"]), ", ".join(row["sources"]))
    _console().print(table)
    for t in task:
        _console().print(f"task {t}: {paths[t]}")


@app.command("list")
def list_cmd() -> None:
    """Registered probes and methods."""
    from .registry import METHODS, PROBES

    _console().print("probes: " + ", ".join(PROBES.names()))
    _console().print("methods: " + ", ".join(METHODS.names()))


def _conventional_metavars(*apps: typer.Typer) -> None:
    """Click's metavars (``--task TEXT``, ``--limit N``, ``RECIPE``) where typer would print ``<str>``."""
    import inspect

    names = {"bool": None, "int": "N", "float": "NUMBER", "Path": "PATH", "str": "TEXT", "list[str]": "TEXT"}
    for a in apps:
        for cmd in a.registered_commands:
            for name, param in inspect.signature(cmd.callback).parameters.items():
                info = param.default
                if getattr(info, "metavar", "") is not None:
                    continue
                if isinstance(info, typer.models.ArgumentInfo):
                    info.metavar = name.upper()
                    continue
                kind = str(param.annotation).removeprefix("Optional[").removesuffix("]")
                info.metavar = names.get(kind, "TEXT") if kind != "bool" else ""


_conventional_metavars(app, data_app)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .data.builtin.sources import SourceMissing

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except SourceMissing as e:  # a data source that cannot be had: one line, wherever it surfaced
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
