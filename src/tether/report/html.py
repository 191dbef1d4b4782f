"""`write_report(run_dir)`: one self-contained static HTML page for any tether run directory.

The page needs no server and fetches nothing: CSS is inline, plots are inline SVG (also written as
``plots/*.svg`` + ``plots/*.png`` in the run directory) and every piece of run text is HTML-escaped.
What it shows follows from the files present (`detect`); a run still going, or one that crashed,
gets whatever its files already hold.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from html import escape
from pathlib import Path
from typing import Any

from ..io import write_text
from . import plots
from .compare import one_line

KINDS = ("train", "eval", "continual", "interpolate", "diagnose")
TRAIN_FILES = ("summary.json", "metrics.jsonl", "guard.jsonl", "probes_base.json", "probes_final.json")
KIND_FILES = {"eval": "report.json", "continual": "continual.json", "interpolate": "interpolate.json",
              "diagnose": "diagnose.json"}
_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2329;background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:12px 28px 60px}header{background:#1d2a38;color:#fff;padding:16px 28px}
header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#b9c6d3}nav a{color:#9fd0ff;margin-right:14px}
section{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:16px 22px;margin:18px 0}
h2{margin:0 0 10px;font-size:19px}h3{font-size:15px;margin:18px 0 6px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 12px}.card small{color:#5b6670;font-size:12px}
.card{border:1px solid #dde2e8;border-radius:6px;padding:8px 12px;min-width:120px;background:#fafbfc}
.card b{display:block;font-size:18px}table{border-collapse:collapse;width:100%;margin:6px 0 12px;font-size:13px}
th,td{border-bottom:1px solid #e6e9ee;padding:5px 8px;text-align:right}th{background:#f0f2f5}
th:first-child,td:first-child{text-align:left}.v{border-radius:4px;padding:1px 7px;color:#fff;font-weight:600}
.v-forgot,.v-stop{background:#c62828}.v-uncertain,.v-adapt{background:#e08a00}.v-ok{background:#2e7d32}
.v-improved{background:#1565c0}.v-warn{background:#a89a00}.v-none{background:#9aa4ae}.v{font-size:12px}
.replay{background:#ede7f6;color:#4527a0;border-radius:4px;padding:0 5px;font-size:11px;margin-left:5px}
tr.hl td{background:#eef7ee;font-weight:600}tr.bad td{color:#c62828}figcaption,.note{color:#5b6670;font-size:12.5px}
pre{background:#f6f8fa;border:1px solid #e1e4e8;border-radius:6px;padding:10px 12px;overflow:auto;font-size:12.5px}
figure{margin:10px 0}figure svg{max-width:100%;height:auto;display:block}"""


# -- loading -----------------------------------------------------------------------------------------
def detect_json(obj: Any) -> str | None:
    """The kind of one JSON document, from its keys."""
    keys = set(obj) if isinstance(obj, dict) else set()
    for kind, need in (("eval", {"meta", "probes"}), ("continual", {"tasks", "matrix"}), ("interpolate", {"alphas"}),
                       ("diagnose", {"blocks"}), ("train", {"methods", "probes", "task"})):
        if keys >= need:
            return kind
    return None


def detect(path: str | Path) -> list[str]:
    """Kinds a run directory (or one JSON file, by its keys) holds. A directory is ``train`` if it has any
    of summary.json, metrics.jsonl, guard.jsonl, probes_base/final.json (or nothing but recipe.yaml),
    ``eval`` if it has report.json, ``continual``/``interpolate``/``diagnose`` if it has <kind>.json."""
    path = Path(path)
    if path.is_file():
        return [k] if (k := detect_json(_read_json(path))) else []
    kinds = [k for k in KINDS if any((path / f).exists() for f in (TRAIN_FILES if k == "train" else [KIND_FILES[k]]))]
    return kinds or (["train"] if (path / "recipe.yaml").exists() else [])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of a JSONL file, skipping (and counting) lines that do not parse, e.g. one torn by a crash."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            row = None
        if isinstance(row, dict) and row:
            rows.append(row)
        bad += not isinstance(row, dict)
    return rows, bad


def load_run(path: str | Path) -> dict[str, Any]:
    """{"kinds", "name", "recipe" (text or None), <kind>: its data} for a run directory or one JSON file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or file")
    kinds = detect(path)
    if not kinds:
        raise ValueError(f"{path}: not a tether run: expected recipe.yaml, summary.json, metrics.jsonl, "
                         "report.json, continual.json, interpolate.json or diagnose.json")
    run: dict[str, Any] = {"kinds": kinds, "name": path.stem if path.is_file() else path.resolve().name}
    if path.is_file():
        obj = _read_json(path)
        run[kinds[0]] = {"summary": obj, "metrics": [], "guard": []} if kinds[0] == "train" else obj
        return run
    run["recipe"] = (path / "recipe.yaml").read_text(encoding="utf-8") if (path / "recipe.yaml").exists() else None
    for k in kinds:
        if k != "train":
            run[k] = _read_json(path / KIND_FILES[k]) or {}
            continue
        (metrics, bad_m), (guard, bad_g) = _read_jsonl(path / "metrics.jsonl"), _read_jsonl(path / "guard.jsonl")
        run[k] = {"summary": _read_json(path / "summary.json"), "metrics": metrics, "guard": guard,
                  "bad_lines": bad_m + bad_g, "base": _read_json(path / "probes_base.json")}
    return run


# -- html pieces (helpers take escaped HTML for cells/values; they escape labels) -----------------------
def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return escape(str(v))
    return escape(format(v + 0.0, spec))  # + 0.0: no "-0.0%"


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{v}</b><small>{escape(k)}</small></div>'
                                           for k, v in items) + "</div>"


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join(f'<tr class="{c}">' + "".join(f"<td>{x}</td>" for x in r) + "</tr>"
                  for r, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _badge(word: Any) -> str:
    w = str(word) if word else "none"
    return f'<span class="v v-{re.sub(r"[^a-z]", "", w.lower()) or "none"}">{escape(w)}</span>'


def _pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _svg_inline(svg: str, prefix: str) -> str:
    """A matplotlib SVG made fit to inline: no XML prolog/DOCTYPE/metadata/namespace URLs, ids prefixed."""
    s = re.sub(r"<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.DOTALL)
    s = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", s, count=2)
    s = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', s)
    return re.sub(r'(href="#|url\(#)([^")]+)', rf"\g<1>{prefix}-\2", s)


def _figure(plots_dir: Path, name: str, fig, caption: str) -> str:
    """Save ``fig`` as plots/<name>.svg/.png and return it as an inline ``<figure>`` ("" for no figure)."""
    if fig is None:
        return ""
    svg = plots.save(fig, plots_dir, name)["svg"].read_text(encoding="utf-8")
    cap = f"<figcaption>{escape(caption)} (also plots/{escape(name)}.png)</figcaption>"
    return f'<figure id="fig-{escape(name)}">{_svg_inline(svg, name)}{cap}</figure>'


def _probe_name(r: dict, key: str = "probe") -> str:
    tag = '<span class="replay" title="shares a source with the replay data">replay</span>'
    return escape(str(r.get(key))) + (tag if r.get("shares_source_with_replay") else "")


def _comparison_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        lo, hi = plots.drop_ci(r)
        body.append([_probe_name(r), escape(str(r.get("metric"))) + ("" if r.get("higher_is_better", True) else " ↓"),
                     _fmt(r.get("n")), _fmt(r.get("base")), _fmt(r.get("tuned")), _fmt(r.get("rel_change"), "+.1%"),
                     f"[{_fmt(r.get('ci_low'), '+.1%')}, {_fmt(r.get('ci_high'), '+.1%')}]",
                     _fmt(r.get("drop"), "+.1%"), f"[{_fmt(lo, '+.1%')}, {_fmt(hi, '+.1%')}]",
                     _flips(r.get("flips")), _badge(r.get("verdict"))])
    classes = ["bad" if r.get("verdict") == "forgot" else "" for r in rows]
    for i in reversed(range(len(rows))):  # MC: the gold-choice probability under its probe, no verdict
        p = (rows[i].get("secondary") or {}).get("prob")
        if p:
            body.insert(i + 1, ["", "prob", _fmt(rows[i].get("n")), _fmt(p.get("base")), _fmt(p.get("tuned")),
                                _fmt(p.get("rel_change"), "+.1%"),
                                f"[{_fmt(p.get('ci_low'), '+.1%')}, {_fmt(p.get('ci_high'), '+.1%')}]", "", "", "", ""])
            classes.insert(i + 1, "")
    head = ["probe", "metric", "n", "base", "tuned", "change", "change 95% CI", "drop", "drop 95% CI",
            "lost / gained", "verdict"]
    return _table(head, body, classes) + (
        '<p class="note">↓ = lower is better. drop = relative loss of ability (positive = worse). '
        "lost / gained = items the base answered right and the tuned model wrong, and the reverse. "
        "prob = the probability the model puts on the right choice, which moves with every item. "
        '<span class="replay">replay</span> = the probe shares a source with the replay data, so replay '
        "flatters it: judge forgetting on the others.</p>")


def _flips(flips: dict | None) -> str:
    return f"{flips['lost']} / {flips['gained']}" if flips else ""


def _flipped_items(rows: list[dict]) -> str:
    """Per right/wrong probe, a folded list of the items lost and gained, with both answers where
    the probe generated them: whether the losses share a cause is read here, not in a count."""
    out = []
    for r in rows:
        f = r.get("flipped") or {}
        if not (f.get("lost") or f.get("gained")):
            continue
        answers = any("base" in it for it in f.get("lost", []) + f.get("gained", []))
        head = ["", "item"] + (["base answer", "tuned answer"] if answers else [])
        texts = ("base", "tuned") if answers else ()
        body = [[way, escape(it["id"]), *(escape(one_line(it.get(k), 160)) for k in texts)]
                for way in ("lost", "gained") for it in f.get(way, [])]
        out.append(f"<details><summary>{escape(str(r.get('probe')))}: {len(f.get('lost', []))} items lost, "
                   f"{len(f.get('gained', []))} gained</summary>{_table(head, body)}</details>")
    return "".join(out)


def _results_table(results: list[dict]) -> str:
    return _table(["probe", "kind", "metric", "n", "score", "95% CI", "seconds"], [
        [_probe_name(r, "name"), escape(str(r.get("kind"))), escape(str(r.get("metric"))), _fmt(r.get("n")),
         _fmt(r.get("score")), f"[{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]", _fmt(r.get("seconds"), ".1f")]
        for r in results])


def _forgetting_cards(general: dict | None) -> list[tuple[str, str]]:
    if not general:
        return []
    return [("forgetting verdict", _badge("forgot" if general.get("forgetting") else "ok")),
            ("forgot probes", escape(", ".join(general.get("forgot_probes") or []) or "none")),
            (f"worst drop ({general.get('worst_probe')})", _fmt(general.get("worst_drop"), "+.1%"))]


# -- sections ----------------------------------------------------------------------------------------------
def _guard_checks(t: dict) -> list[dict]:
    """guard.jsonl, else the guard lines the Trainer logged into metrics.jsonl (worst drop only)."""
    return t["guard"] or [
        {"step": m["step"], "task_score": m.get("guard/task_score"), "worst_drop": m["guard/worst_drop"],
         "breached": ["?"] if m.get("guard/breached") else [], "action": None}
        for m in t["metrics"] if "guard/worst_drop" in m and "step" in m]


def _action(check: dict) -> str:
    """The guard's action at one check, with what ``adapt`` changed (lr factor, new replay ratio)."""
    if not check.get("action"):
        return "—"
    what = [f"{k} {check[k]:g}" for k in ("lr_factor", "replay_ratio") if isinstance(check.get(k), (int, float))]
    return _badge(check["action"]) + (f" {escape(', '.join(what))}" if what else "")


def _train(t: dict, recipe: dict, pd: Path) -> str:
    s, rg = t.get("summary") or {}, recipe.get("guard") or {}
    g, task, checks = s.get("guard") or {}, s.get("task") or {}, _guard_checks(t)
    thr = g.get("threshold", (s.get("general") or {}).get("threshold", rg.get("threshold")))
    base_task = task.get("base", (t.get("base") or {}).get("task"))
    steps = s.get("steps", max((m.get("step", 0) for m in t["metrics"]), default=None))
    methods = ", ".join(s.get("methods") or list(recipe.get("methods") or {}))
    cards = [("methods", escape(methods or "—")), ("steps", _fmt(steps)), ("train loss", _fmt(s.get("train_loss"))),
             ("seconds", _fmt(s.get("seconds"), ".0f")), ("task gain", _fmt(task.get("gain"), "+.3f")),
             ("task base → final", f"{_fmt(base_task, '.3f')} → {_fmt(task.get('final'), '.3f')}")]
    cards += _forgetting_cards(s.get("general"))
    if g or checks:
        action, every = g.get("action", rg.get("action", "?")), g.get("every", rg.get("every"))
        cards += [("guard", escape(f"{action} every {every}")),
                  ("guard stopped at", _fmt(g.get("stopped_at"))), ("restored step", _fmt(g.get("restored_step")))]
    out = ['<section id="train"><h2>Training run</h2>']
    if not s:
        out.append('<p class="note">No summary.json: the run is still going or stopped early; this shows '
                   "what it has logged so far.</p>")
        cards = [c for c in cards if c[1] not in ("—", "— → —")]
    if t.get("bad_lines"):
        out.append(f'<p class="note">{t["bad_lines"]} unreadable JSONL line(s) skipped (a torn last write?).</p>')
    out += [_cards(cards), _figure(pd, "train_guard", plots.guard_timeline(checks, thr, base_task, g.get(
        "restored_step")), "Task score and each guarded probe's relative drop at every check; dashed red = budget; "
        "vertical lines = guard actions")]
    if checks:
        out.append("<h3>Guard checks</h3>" + _table(["step", "task score", "worst drop", "breached", "action"], [
            [_fmt(c.get("step")), _fmt(c.get("task_score"), ".3f"), _fmt(c.get("worst_drop"), "+.1%"),
             escape(", ".join(c.get("breached") or []) or "—"), _action(c)] for c in checks]))
    out.append(_figure(pd, "train_loss", plots.training_curves(t["metrics"]),
                       "Loss, learning rate and gradient norm per logged step"))
    if s.get("probes"):
        out += ["<h3>General probes: base vs tuned</h3>", _comparison_table(s["probes"]), _flipped_items(s["probes"]),
                _figure(pd, "train_probes", plots.probe_changes(s["probes"], thr), "Relative drop per probe, 95% CI")]
    elif (t.get("base") or {}).get("general"):
        out.append("<h3>Base model probe scores</h3>" + _results_table(t["base"]["general"]))
    if s.get("method_metrics"):
        out.append("<h3>Method metrics</h3>" + _pre(_yaml(s["method_metrics"])))
    return "".join(out) + "</section>"


def _eval(r: dict, pd: Path) -> str:
    meta, summ, rows = r.get("meta") or {}, r.get("summary") or {}, r.get("probes") or []
    thr = meta.get("threshold", summ.get("threshold"))
    cards = [(k, escape(str(meta.get(k, "—")))) for k in ("base", "tuned", "suite")]
    out = ['<section id="eval"><h2>Forgetting report</h2>', _cards(cards + [
        ("threshold", _fmt(thr, ".0%")), ("seconds", _fmt(meta.get("seconds"), ".0f"))] + _forgetting_cards(summ)),
        _comparison_table(rows), _flipped_items(rows), _figure(pd, "eval_probes", plots.probe_changes(rows, thr),
                                         "Relative drop per probe, 95% CI (paired bootstrap)")]
    for key, title in (("base_results", "Base model"), ("tuned_results", "Tuned model")):
        if r.get(key):
            out.append(f"<details><summary>{title}: raw probe scores</summary>{_results_table(r[key])}</details>")
    return "".join(out) + "</section>"


def _continual(c: dict, pd: Path) -> str:
    m, tasks = c.get("metrics") or {}, c.get("tasks") or []
    out = ['<section id="continual"><h2>Continual learning</h2>', _cards(
        [("methods", escape(", ".join(c.get("methods") or []) or "—")), ("tasks", _fmt(len(tasks))),
         ("average accuracy", _fmt(m.get("acc"), ".3f")), ("backward transfer", _fmt(m.get("bwt"), "+.3f")),
         ("forward transfer", _fmt(m.get("fwt"), "+.3f"))]),
        _figure(pd, "continual_matrix", plots.accuracy_matrix(tasks, c.get("matrix") or [], c.get("base")),
                "Row i, column j: score on task j after training on task i"),
        _figure(pd, "continual_general", plots.continual_general(tasks, c.get("general_probes") or [],
                                                                  c.get("general") or []),
                "Relative change of each general probe against the base model after each task")]
    if m.get("forgetting"):
        out.append("<h3>Forgetting per task</h3>" + _table(["task", "forgetting (best − final)"], [
            [escape(str(t)), _fmt(f, ".3f")] for t, f in zip(tasks, m["forgetting"])]))
    return "".join(out) + "</section>"


def _interpolate(d: dict, pd: Path) -> str:
    alphas, budget, chosen = d.get("alphas") or [], d.get("budget"), d.get("chosen_alpha")
    task, drop = d.get("task") or [], d.get("general_drop") or []
    i = alphas.index(chosen) if chosen in alphas else len(alphas)
    at = dict(zip(("task", "drop"), (xs[i] if i < len(xs) else None for xs in (task, drop))))
    classes = ["hl" if a == chosen else "bad" if budget is not None and w is not None and w > budget else ""
               for a, w in zip(alphas, drop)]
    return "".join(['<section id="interpolate"><h2>Weight interpolation</h2>', _cards(
        [("chosen alpha", _fmt(chosen, "g")), ("budget", _fmt(budget, ".0%")),
         ("task score at choice", _fmt(at["task"], ".3f")), ("worst drop at choice", _fmt(at["drop"], "+.1%"))]),
        _figure(pd, "interpolation", plots.interpolation(alphas, task, drop, d.get("per_probe"), budget, chosen),
                "Task score and worst general drop against alpha; chosen = largest alpha within budget"),
        _table(["alpha", "task score", "worst general drop"],
               [[_fmt(a, "g"), _fmt(t, ".3f"), _fmt(w, "+.1%")] for a, t, w in zip(alphas, task, drop)], classes),
        "</section>"])


def _diagnose(d: dict, pd: Path) -> str:
    blocks, sug = d.get("blocks") or [], d.get("suggestion") or {}
    top = sorted(blocks, key=lambda b: b.get("weight_change") or 0, reverse=True)[:3]
    out = ['<section id="diagnose"><h2>Diagnosis</h2>', _cards(
        [("KL to base (nats/token)", _fmt(d.get("kl"), ".4f")), ("blocks", _fmt(len(blocks))),
         ("most changed blocks", escape(", ".join(str(b.get("index")) for b in top) or "—"))]),
        _figure(pd, "layer_drift", plots.layer_drift(blocks),
                "Relative weight change (attention vs MLP) and 1 − CKA per block")]
    if sug.get("text"):
        out.append(f"<h3>Suggestion</h3><p>{escape(str(sug['text']))}</p>")
    if sug.get("recipe"):
        out.append("<h3>Suggested recipe</h3>" + _pre(_yaml(sug["recipe"])))
    return "".join(out) + "</section>"


# -- the page ------------------------------------------------------------------------------------------
def render(run: dict[str, Any], plots_dir: Path) -> str:
    """The page for a loaded run (`load_run`); writes its plots into ``plots_dir``."""
    import yaml

    try:
        recipe = yaml.safe_load(run.get("recipe") or "")
    except yaml.YAMLError:
        recipe = None
    recipe = recipe if isinstance(recipe, dict) else {}
    sections = {"train": lambda x: _train(x, recipe, plots_dir), "eval": _eval, "continual": _continual,
                "interpolate": _interpolate, "diagnose": _diagnose}
    body = [sections[k](run[k]) if k == "train" else sections[k](run[k], plots_dir) for k in run["kinds"]]
    ids = list(run["kinds"])
    if run.get("recipe"):
        body.append(f'<section id="recipe"><h2>Recipe</h2>{_pre(run["recipe"])}</section>')
        ids.append("recipe")
    nav = "".join(f'<a href="#{k}">{k}</a>' for k in ids)
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = escape(f"tether report: {run['name']}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f"<style>{_CSS}</style></head><body><header><h1>{title}</h1><p>{' + '.join(run['kinds'])} · generated "
            f"{when}</p><nav>{nav}</nav></header><main>{''.join(body)}</main></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page for a run directory (or one report/continual/interpolate/diagnose/summary JSON file)
    and its plots (``plots/*.svg`` and ``plots/*.png`` in the run directory, atomically); returns the page's
    path: ``out``, by default ``<run_dir>/report.html`` (``<file>.html`` beside a file)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if out is None:
        out = run_dir.with_suffix(".html") if run_dir.is_file() else run_dir / "report.html"
    return write_text(out, render(run, (run_dir.parent if run_dir.is_file() else run_dir) / "plots"))
