"""`autotune report`: the page is self-contained, holds every figure and table, renders in
headless Chromium with the plots drawn; `--png` writes the same figures; `best --pareto` marks
which front points meet the SLO; the README's report/export/deploy commands work."""

import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.report import FIGURES

from sample_study import SLO, STUDY, sample_copy

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Namespace URIs matplotlib writes into SVG: identifiers, never fetched.
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    return sample_copy(tmp_path_factory, folder), folder


@pytest.fixture(scope="module")
def page(study):
    url, folder = study
    r = cli("report", "--storage", url, "--out", folder / "report.html", "--png",
            folder / "png", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    return folder / "report.html", info


def figure_html(text: str, name: str) -> str:
    start = text.index(f'<figure class="plot" id="fig-{name}">')
    return text[start:text.index("</figure>", start)]


def test_page_is_self_contained_and_holds_every_figure(page):
    path, info = page
    text = path.read_text()
    assert [f["name"] for f in info["figures"]] == list(FIGURES)
    assert "<script" not in text and "<link" not in text and "<img" not in text
    # Links only inside the page (#id) or inline data (the grid's raster is a data: URI).
    assert not re.search(r"""(src|href)=["'](?!#|data:)""", text), "nothing may be loaded"
    for url in set(re.findall(r"https?://[^\s\"'<>)]+", text)):
        assert url in NAMESPACES, f"external reference {url}"
    for name in FIGURES:
        svg = figure_html(text, name)
        assert "<svg" in svg and svg.count("<path") > 20, name
        assert f"autotune-{name}" not in svg  # ids are salted, not the salt itself
    # Marker and clip ids are unique across the inline SVGs of one page.
    ids = re.findall(r'<(?:path|clipPath) id="([mp][0-9a-f]{6,})"', text)
    assert len(ids) == len(set(ids))


def test_page_tells_the_recommendation_scenario_failures_and_versions(page, study):
    url, _ = study
    text = html.unescape(page[0].read_text())
    best = json.loads(cli("best", "--storage", url, "--json").stdout)["best"][0]
    assert f"Recommended: {best['label']}" in text
    assert "llama-3.1-70b" in text and SLO in text and "8 x h100" in text
    for reason in ("oom", "crashed", "illegal memory access", "does not fit"):
        assert reason in text, reason
    for dist in ("optuna", "sqlalchemy", "matplotlib", "python"):
        assert dist in text, dist
    assert "The shaded band" in figure_html(text, "pareto")  # the SLO's region, explained
    assert f"autotune deploy --storage {url} --study {STUDY}" in text


def test_png_files_are_the_same_figures_and_not_blank(page):
    _, info = page
    import matplotlib.image as mpimg

    assert [Path(p).name for p in info["png"]] == [f"{n}.png" for n in FIGURES]
    for p in info["png"]:
        img = mpimg.imread(p)[..., :3]
        assert img.shape[0] > 300 and img.shape[1] > 500, p
        ink = (img.min(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
        assert ink > 0.02 and img.std() > 0.05, p


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}",
         *args],
        capture_output=True, text=True, timeout=120, check=False)


#: Colours each figure must show once drawn (RGB 0-255), from autotune.report's palette.
TEAL, RED, ORANGE, DARK_RED = (27, 158, 119), (214, 39, 40), (242, 142, 43), (178, 24, 43)
VIRIDIS_TOP = (253, 231, 37)  # the grid's best cell
FIGURE_COLOURS = {"pareto": [TEAL, RED], "curves": [RED], "grid": [VIRIDIS_TOP],
                  "progress": [TEAL, ORANGE], "outcomes": [TEAL, ORANGE, DARK_RED]}


def pixels_near(img: np.ndarray, rgb, tol: int = 30) -> int:
    return int((np.abs(img.astype(int) - np.array(rgb)).max(axis=2) <= tol).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs "
                    "Debian's chromium package)")
def test_chromium_draws_every_figure(page, tmp_path):
    import matplotlib.image as mpimg

    path, _ = page
    # The DOM Chromium built: every figure is an SVG element with drawn paths and markers.
    dom = chromium("--dump-dom", path.as_uri(), tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in FIGURES:
        svg = figure_html(dom.stdout, name)
        assert "<svg" in svg and svg.count("<path") > 20, name
    assert figure_html(dom.stdout, "pareto").count("<use") > 10  # scatter markers

    # The whole page, as a person would see it.
    shot = tmp_path / "report.png"
    r = chromium(f"--screenshot={shot}", "--window-size=1400,5200", path.as_uri(),
                 tmp=tmp_path)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    img = (mpimg.imread(shot)[..., :3] * 255).astype(np.uint8)
    assert (img.min(axis=2) < 230).mean() > 0.05 and pixels_near(img, TEAL) > 2000
    if os.environ.get("AUTOTUNE_SCREENSHOT_DIR"):
        keep = Path(os.environ["AUTOTUNE_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / "report.png")

    # The figures alone, one per 880-px band (the rest of the page hidden): each is drawn,
    # with its own colours.
    band = 880
    css = ("<style>body { margin: 0 !important; padding: 0 !important; } "
           "body > *:not(figure) { display: none !important; } figcaption { display: none; } "
           f"figure.plot {{ height: {band}px; margin: 0 !important; overflow: hidden; }}"
           "</style></head>")
    only = tmp_path / "figures-only.html"
    only.write_text(path.read_text().replace("</head>", css, 1))
    png = tmp_path / "figures-only.png"
    r = chromium(f"--screenshot={png}", f"--window-size=1400,{band * len(FIGURES)}",
                 only.as_uri(), tmp=tmp_path)
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]
    bands = (mpimg.imread(png)[..., :3] * 255).astype(np.uint8)
    for k, name in enumerate(FIGURES):
        img = bands[k * band:(k + 1) * band]
        ink = img.min(axis=2) < 245
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        assert rows.size and rows[-1] - rows[0] > 300 and cols[-1] - cols[0] > 500, name
        box = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.mean() > 0.03, f"{name}: only {box.mean():.3f} of its area drawn"
        assert (img.max(axis=2) < 128).sum() > 2000, f"{name}: no axes or labels"
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50, name  # not a flat block
        for rgb in FIGURE_COLOURS[name]:
            assert pixels_near(img, rgb) > 30, (name, rgb)


def test_report_of_a_study_where_nothing_meets_the_slo(tmp_path_factory, tmp_path):
    url = sample_copy(tmp_path_factory, tmp_path, "hopeless")
    out = tmp_path / "r.html"
    r = cli("report", "--storage", url, "--out", out)
    assert r.exit_code == 0, r.output
    text = html.unescape(out.read_text())
    assert "No configuration meets the SLO" in text and "Closest" in text
    assert "the star is the closest" in text


def test_report_of_a_study_without_trials_and_without_slo(tmp_path):
    from autotune.runners.sim import SimRunner
    from autotune.space import SearchSpace
    from autotune.study import Tuner, open_storage

    from sample_study import SPACE, scenario

    url = f"sqlite:///{tmp_path / 'e.db'}"
    scen = scenario(None)
    Tuner(scen, SearchSpace.from_dict(SPACE), SimRunner(scen), open_storage(url), "empty").open()
    out = tmp_path / "r.html"
    # An empty study is never the default: it is reported when named.
    r = cli("report", "--storage", url, "--out", out)
    assert r.exit_code == 2 and "has a trial yet" in r.stderr and not out.exists()
    r = cli("report", "--storage", url, "--study", "empty", "--out", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert all(f'id="fig-{n}"' in text for n in FIGURES)
    assert "No measured load points" in text and "none (maximum throughput)" in text


@pytest.mark.parametrize("args, message", [
    (["--out", "missing-folder/r.html"], "does not exist"),
    (["--out", "."], "is a folder"),
    (["--out", "r.html", "--study", "nope"], "no study named 'nope'"),
    (["--out", "r.html", "--png", "r.html/figs"], "does not exist"),
], ids=["out-folder-missing", "out-is-a-folder", "unknown-study", "png-under-a-file"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(study, tmp_path, monkeypatch, args,
                                                         message):
    url, _ = study
    monkeypatch.chdir(tmp_path)
    r = cli("report", "--storage", url, *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == []


def test_report_without_matplotlib_says_how_to_install_it(study, tmp_path, monkeypatch):
    url, _ = study
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = cli("report", "--storage", url, "--out", tmp_path / "r.html")
    assert r.exit_code == 2 and "pip install 'autotune-llm[report]'" in r.stderr, r.output
    assert not (tmp_path / "r.html").exists()


def test_report_of_a_missing_database_is_a_user_error(tmp_path):
    r = cli("report", "--storage", f"sqlite:///{tmp_path / 'none.db'}", "--out",
            tmp_path / "r.html")
    assert r.exit_code == 2 and not (tmp_path / "r.html").exists()


def test_best_pareto_marks_which_front_points_meet_the_slo(study):
    url, _ = study
    data = json.loads(cli("best", "--storage", url, "--json", "--top", 3, "--pareto").stdout)
    front = data["pareto"]
    assert front and {"config", "label", "trial", "concurrency", "output_tok_s_per_gpu",
                      "output_tok_s_per_user", "slo_met"} <= set(front[0])
    users = [p["output_tok_s_per_user"] for p in front]
    gpus = [p["output_tok_s_per_gpu"] for p in front]
    assert users == sorted(users, reverse=True) and gpus == sorted(gpus)  # non-dominated
    assert any(p["slo_met"] for p in front)
    best = data["best"][0]
    assert all(t["met"] and t["margin"] >= 0 for t in best["slo"])
    # The best feasible point is on the front of the points that meet the SLO: nothing that
    # meets it is both faster per user and more productive per GPU.
    assert not any(p["slo_met"] and p["output_tok_s_per_gpu"] > best["throughput"][
        "output_tok_s_per_gpu"] for p in front)
    table = cli("best", "--storage", url, "--top", 3, "--pareto").stdout
    assert "Pareto front" in table and "met" in table and "#3" in table


def readme_section_commands() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Reports, exports and deploy files", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.+?)\n```", section, flags=re.DOTALL)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_readme_commands_go_from_a_search_to_a_report_and_a_deploy_folder(study, tmp_path,
                                                                         monkeypatch):
    _, folder = study
    monkeypatch.chdir(tmp_path)
    # The study in the default storage of the working directory, as after the quick start.
    shutil.copy(folder / f"{STUDY}.db", tmp_path / "autotune.db")
    commands = readme_section_commands()
    assert commands[0][:2] == [".venv/bin/pip", "install"]  # the extras the commands need
    for argv in commands[1:]:
        assert argv[0] == ".venv/bin/autotune", argv
        r = runner.invoke(app, argv[1:])
        assert r.exit_code == 0, (argv, r.output)
    assert (tmp_path / "report.html").stat().st_size > 50_000
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(
        f"{n}.png" for n in FIGURES)
    assert (tmp_path / "measurements.parquet").stat().st_size > 0
    assert {"serve.sh", "bench.sh", "extra_llm_api_options.yaml", "config.json",
            "README.txt"} == {p.name for p in (tmp_path / "deploy").iterdir()}


def test_every_trial_carries_feasible_for_optuna_dashboard(study):
    import optuna

    url, _ = study
    trials = optuna.load_study(study_name=STUDY, storage=url).trials
    assert trials and all(isinstance(t.user_attrs.get("feasible"), bool) for t in trials)
    assert {t.user_attrs["status"] for t in trials} >= {"ok", "reused", "infeasible", "failed"}
