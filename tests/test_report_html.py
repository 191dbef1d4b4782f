"""`tether report`: one static HTML page per run kind, from hand-written fixture runs.

Checked twice: statically (self-contained, escaped, plots written beside the run) and in a real
headless chromium (no console messages, no network request made by the page, a non-blank screenshot).
The browser comes from scripts/install-browser.sh (Debian chromium); the browser tests skip, saying
why, only when no browser can be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tether.report import plots
from tether.report.html import detect, load_run, write_report

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "runs"
EXPECT = {  # fixture -> (kinds, plot files, text the page must show)
    "train": (["train"], ["train_guard", "train_loss", "train_probes"],
              ["v-forgot", "v-uncertain", "v-improved", "v-stop", "restored step", "target_modules", "lora, replay"]),
    "train_partial": (["train"], ["train_guard", "train_loss"],
                      ["No summary.json", "1 unreadable JSONL line", "v-adapt", "adapt every 20",
                       "lr_factor 0.5, replay_ratio 0.3"]),
    "eval": (["eval"], ["eval_probes"], ["HuggingFaceTB/SmolLM2-135M-Instruct", "v-forgot", "raw probe scores",
                                      "<td>3 / 2</td>", "<td>prob</td>", "<td>-0.6%</td>",
                                      "arc_easy: 3 items lost, 2 gained", "<td>ARC-Easy/17</td>",
                                      "trivia: 1 items lost, 0 gained", "<th>base answer</th>", "<td>positive</td>"]),
    "continual": (["continual"], ["continual_matrix", "continual_general"], ["backward transfer", "-0.045"]),
    "interpolate": (["interpolate"], ["interpolation"], ["chosen alpha", '<tr class="hl"><td>0.7</td>']),
    "diagnose": (["diagnose"], ["layer_drift"], ["0.0421", "Freeze blocks 0-17", "q_proj"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A writable copy of the fixture runs with every page written (plots land in the run dirs)."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(FIXTURES, root, dirs_exist_ok=True)
    for name in EXPECT:
        assert write_report(root / name) == root / name / "report.html"
    return root


class _Refs(HTMLParser):
    """Every URL-bearing attribute and every tag of a page."""

    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href", "action", "srcset", "data")]


def _refs(page: str) -> _Refs:
    p = _Refs()
    p.feed(page)
    return p


# -- static --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPECT)
def test_detects_the_run_kind(name):
    assert detect(FIXTURES / name) == EXPECT[name][0]


def test_detects_single_files_and_rejects_other_dirs(tmp_path):
    assert detect(FIXTURES / "eval" / "report.json") == ["eval"]
    assert detect(FIXTURES / "interpolate" / "interpolate.json") == ["interpolate"]
    assert detect(FIXTURES / "train" / "summary.json") == ["train"]
    with pytest.raises(ValueError, match="not a tether run"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")
    (tmp_path / "recipe.yaml").write_text("model: {name: x}\n")  # a train run that logged nothing yet
    assert detect(tmp_path) == ["train"]


@pytest.mark.parametrize("name", EXPECT)
def test_page_is_self_contained(runs, name):
    page = (runs / name / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    refs = _refs(page)
    assert refs.refs and all(r.startswith(("#", "data:")) for r in refs.refs), refs.refs
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "@import" not in page and "<link rel=\"stylesheet\"" not in page
    assert all(u.startswith("#") for u in page.split("url(")[1:]), "url() must only point inside the page"
    assert refs.tags.count("svg") == len(EXPECT[name][1])  # every plot inlined
    for text in EXPECT[name][2]:
        assert text in page, text


@pytest.mark.parametrize("name", EXPECT)
def test_plots_are_written_beside_the_run(runs, name):
    import matplotlib.image as mpimg

    for stem in EXPECT[name][1]:
        svg, png = runs / name / "plots" / f"{stem}.svg", runs / name / "plots" / f"{stem}.png"
        assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")
        img = mpimg.imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05
    assert not list((runs / name).rglob("*.tmp")), "atomic writes leave no temp files"


def test_eval_page_from_the_json_file_alone(tmp_path):
    shutil.copy(FIXTURES / "eval" / "report.json", tmp_path / "report.json")
    out = write_report(tmp_path / "report.json")
    assert out == tmp_path / "report.html"
    assert "Forgetting report" in out.read_text(encoding="utf-8")
    assert (tmp_path / "plots" / "eval_probes.png").exists()


def test_several_kinds_in_one_dir_and_an_explicit_output(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "train", run)
    shutil.copy(FIXTURES / "diagnose" / "diagnose.json", run)
    out = write_report(run, out=tmp_path / "site" / "page.html")
    page = out.read_text(encoding="utf-8")
    assert load_run(run)["kinds"] == ["train", "diagnose"]
    assert 'id="train"' in page and 'id="diagnose"' in page and 'id="recipe"' in page
    assert (run / "plots" / "layer_drift.svg").exists() and not (run / "report.html").exists()


def test_all_run_text_is_escaped(tmp_path):
    evil = '<script>alert("x")</script><img src=https://evil.example/x.png onerror=alert(1)>'
    report = json.loads((FIXTURES / "eval" / "report.json").read_text())
    report["meta"]["tuned"] = evil
    report["probes"][0]["probe"] = evil
    report["probes"][0]["verdict"] = '"><script>x</script>'
    report["probes"][-1]["flipped"]["lost"][0]["tuned"] = evil
    (tmp_path / "report.json").write_text(json.dumps(report))
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert all(r.startswith(("#", "data:")) for r in _refs(page).refs)


def test_plot_functions_return_none_without_data():
    assert plots.training_curves([{"event": "end"}]) is None
    assert plots.guard_timeline([], 0.05) is None
    assert plots.probe_changes([], 0.05) is None
    assert plots.accuracy_matrix([], []) is None
    assert plots.interpolation([], [], []) is None
    assert plots.layer_drift([]) is None
    # gaps (None scores) are drawn as gaps, not errors
    assert plots.guard_timeline([{"step": 5, "task_score": None, "worst_drop": None}], None) is not None


# -- a real browser ------------------------------------------------------------------------------------
def _find_browser() -> str | None:
    for b in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(b):
            return shutil.which(b)
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = _find_browser()
    if path is None:
        script = ROOT / "scripts" / "install-browser.sh"
        try:
            r = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True, timeout=900)
            why = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        except (OSError, subprocess.TimeoutExpired) as e:
            why = [str(e)]
        path = _find_browser()
        if path is None:
            pytest.skip(f"no headless browser: scripts/install-browser.sh could not install chromium ({why[0]})")
    return path


def _load_in_browser(browser: str, page: Path, work: Path) -> dict:
    """One chromium process: load ``page`` from file://, screenshot it; its console lines and the
    network requests the page made (from chromium's net log)."""
    work.mkdir(parents=True, exist_ok=True)
    shot, netlog = work / "shot.png", work / "net.json"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={work / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--log-net-log={netlog}",
           f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the browser and the helpers it started
        proc.communicate()
        pytest.fail(f"chromium did not finish {page} within 30 s")
    console = [ln for ln in out.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    requests = []
    if netlog.exists():
        log = json.loads(netlog.read_text(encoding="utf-8", errors="replace") or "{}")
        start = log.get("constants", {}).get("logEventTypes", {}).get("URL_REQUEST_START_JOB")
        for ev in log.get("events", []):
            p = ev.get("params") or {}
            page_made = "file://" in p.get("network_isolation_key", "") + p.get("site_for_cookies", "")
            if ev.get("type") == start and page_made:  # the browser's own background requests have other keys
                requests.append(p.get("url"))
    return {"rc": proc.returncode, "output": out, "console": console, "requests": requests,
            "shot": shot if shot.exists() else None}


def _check_screenshot(shot: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1280)
    assert img.std() > 0.05, "blank screenshot"
    assert (img.mean(axis=2) < 0.5).mean() > 0.005, "no dark pixels: no text or lines drawn"
    colourful = (img.max(axis=2) - img.min(axis=2)) > 0.3
    assert colourful.mean() > 0.001, "no coloured pixels: plots and badges did not render"


def test_browser_check_catches_console_errors_and_fetches(browser, tmp_path):
    """The harness itself: a page with a script error and a remote image must fail both checks."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><h1>x</h1>'
                   '<img src="https://example.com/pixel.png"><script>notDefined();</script></body></html>')
    r = _load_in_browser(browser, bad, tmp_path / "b")
    assert any("notDefined" in ln for ln in r["console"]), r["output"][-2000:]
    assert "https://example.com/pixel.png" in r["requests"]


@pytest.mark.parametrize("name", EXPECT)
def test_page_renders_in_headless_chromium(browser, runs, tmp_path, name):
    r = _load_in_browser(browser, runs / name / "report.html", tmp_path)
    assert r["rc"] == 0 and r["shot"] is not None, r["output"][-2000:]
    assert r["console"] == [], r["console"]
    assert r["requests"] == [], f"the page fetched {r['requests']}"
    _check_screenshot(r["shot"])
    if os.environ.get("TETHER_KEEP_SCREENSHOTS"):  # to look at them: TETHER_KEEP_SCREENSHOTS=dir
        dest = Path(os.environ["TETHER_KEEP_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["shot"], dest / f"{name}.png")
