"""`autotune export`: one row per load point with config, workload, outcome and metrics; the
same table from SQLite and PostgreSQL; csv, json and parquet; bad input writes nothing."""

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.export import COLUMNS, LATENCY_COLUMNS
from autotune.recommend import Results
from autotune.study import open_storage

from sample_study import STUDY, build_study, sample_copy

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return sample_copy(tmp_path_factory, tmp_path_factory.mktemp("export"))


def export(url, out, *extra):
    r = cli("export", "--storage", url, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    return r


def read(path, fmt):
    if fmt == "csv":
        return pd.read_csv(path)
    if fmt == "json":
        return pd.DataFrame(json.loads(path.read_text()))
    return pd.read_parquet(path)


def test_one_row_per_load_point_and_one_per_trial_without_points(study, tmp_path):
    out = tmp_path / "m.csv"
    r = export(study, out, "--json")
    summary = json.loads(r.stdout)
    frame = pd.read_csv(out)
    rows = open_storage(study, create=False).store.measurements(STUDY)
    assert summary["rows"] == len(frame) == sum(max(1, len(m.load_points)) for m in rows)
    assert list(frame.columns) == list(COLUMNS) == summary["columns"]
    assert summary["measurements"] == len(rows) == frame["measurement_id"].nunique()
    assert {"ok", "reused", "infeasible", "failed"} <= set(frame["status"])
    measured = frame[frame["status"] == "ok"]
    assert measured["concurrency"].notna().all() and measured["tpot_p99_ms"].notna().all()
    # Each measured trial has exactly one operating point, and it is the one its trial chose.
    assert (measured.groupby("trial")["operating_point"].sum() == 1).all()
    # slo_met is the SLO applied to the row's own metrics (tpot:p99<=30ms).
    assert (measured["slo_met"] == (measured["tpot_p99_ms"] <= 30.0)).all()
    # Rows without load points keep the trial's outcome and leave the metrics empty.
    other = frame[frame["status"] != "ok"]
    assert other[["concurrency", "output_tok_s_per_gpu", *LATENCY_COLUMNS]].isna().all().all()
    assert other.loc[other["status"] == "reused", "reused_from"].notna().all()
    failed = other[other["status"].isin(["failed", "infeasible"])]
    assert failed["failure_class"].notna().all() and failed["message"].str.len().gt(0).all()
    assert set(failed["failure_class"]) == {"oom", "crashed"}
    assert (frame["gpus"] == frame["tp"] * frame["pp"] * frame["dp"]).all()
    assert (frame["isl"] == 1024).all() and (frame["osl"] == 256).all()


def values(series) -> list:
    """Plain Python values, missing ones as None (formats disagree on NaN, NA and dtypes)."""
    return [None if pd.isna(v) else v.item() if hasattr(v, "item") else v for v in series]


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_every_format_holds_the_same_table(study, tmp_path, fmt):
    from autotune.export import load_point_frame

    base = load_point_frame(Results(open_storage(study, create=False).store, STUDY))
    out = tmp_path / f"m.{fmt}"
    export(study, out, "--format", fmt)
    frame = read(out, fmt)
    assert list(frame.columns) == list(base.columns) and len(frame) == len(base)
    for col in ("trial", "status", "label", "concurrency", "chunked_prefill", "slo_met",
                "failure_class"):
        assert values(frame[col]) == values(base[col]), col
    for col in ("output_tok_s_per_gpu", "output_tok_s_per_user", "tpot_p99_ms", "kv_fraction"):
        got, want = values(frame[col]), values(base[col])
        assert [g is None for g in got] == [w is None for w in want], col
        assert all(g == pytest.approx(w, rel=1e-9) for g, w in zip(got, want) if w is not None)


def test_format_comes_from_the_suffix_when_not_given(study, tmp_path):
    out = tmp_path / "m.json"
    export(study, out)
    data = json.loads(out.read_text())
    assert isinstance(data, list) and data[0]["study"] == STUDY
    assert data[0]["started_at"].endswith("Z") or "+00:00" in data[0]["started_at"]


@pytest.mark.parametrize("args, message", [
    (["--format", "xlsx", "--out", "m.xlsx"], "unknown --format 'xlsx'"),
    (["--out", "missing/m.csv"], "does not exist"),
    (["--out", "."], "is a folder"),
    (["--out", "m.csv", "--study", "nope"], "no study named 'nope'"),
], ids=["unknown-format", "out-folder-missing", "out-is-a-folder", "unknown-study"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(study, tmp_path, monkeypatch, args,
                                                         message):
    monkeypatch.chdir(tmp_path)
    r = cli("export", "--storage", study, *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_unwritable_folder_is_refused(study, tmp_path, monkeypatch):
    import autotune.atomic

    # As a read-only folder looks to a non-root user (root may write anywhere).
    monkeypatch.setattr(autotune.atomic.os, "access", lambda path, mode: False)
    r = cli("export", "--storage", study, "--out", tmp_path / "m.csv")
    assert r.exit_code == 2 and "is not writable" in r.stderr, r.output
    assert os.listdir(tmp_path) == []


def test_parquet_without_pyarrow_says_how_to_install_it(study, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    r = cli("export", "--storage", study, "--format", "parquet", "--out", tmp_path / "m.pq")
    assert r.exit_code == 2 and "pip install 'autotune-llm[export]'" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_a_failed_write_leaves_the_old_file(study, tmp_path, monkeypatch):
    out = tmp_path / "m.csv"
    out.write_text("old\n")

    def broken(self, path, *a, **k):
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError):
        runner.invoke(app, ["export", "--storage", study, "--out", str(out), "--force"],
                      catch_exceptions=False)
    assert out.read_text() == "old\n" and os.listdir(tmp_path) == ["m.csv"]


def test_an_existing_file_is_replaced_only_with_force(study, tmp_path):
    out = tmp_path / "m.csv"
    out.write_text("old\n")
    r = runner.invoke(app, ["export", "--storage", study, "--out", str(out)])
    assert r.exit_code == 2 and "exists" in r.stderr and "--force" in r.stderr
    assert out.read_text() == "old\n"
    r = runner.invoke(app, ["export", "--storage", study, "--out", str(out), "--force"])
    assert r.exit_code == 0, r.stderr
    assert out.read_text().startswith("measurement_id") or out.read_text() != "old\n"


def test_postgresql_gives_the_same_table_report_and_deploy_folder(study, postgres_url,
                                                                   tmp_path):
    from autotune.export import load_point_frame

    build_study(postgres_url)
    frames = [load_point_frame(Results(open_storage(url, create=False).store, STUDY))
              for url in (study, postgres_url)]
    for f in frames:
        assert str(f["started_at"].dtype) == "datetime64[us, UTC]"
    volatile = ["host", "started_at", "finished_at"]
    pd.testing.assert_frame_equal(frames[0].drop(columns=volatile),
                                  frames[1].drop(columns=volatile), rtol=1e-9)
    export(postgres_url, tmp_path / "pg.parquet")
    assert len(pd.read_parquet(tmp_path / "pg.parquet")) == len(frames[0])
    # The report and the deploy folder read the same study the same way.
    r = cli("report", "--storage", postgres_url, "--out", tmp_path / "pg.html")
    assert r.exit_code == 0, r.output
    assert "postgresql" in (tmp_path / "pg.html").read_text()
    for name, url in (("sqlite", study), ("pg", postgres_url)):
        r = cli("deploy", "--storage", url, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    assert (tmp_path / "sqlite" / "serve.sh").read_text() == \
        (tmp_path / "pg" / "serve.sh").read_text()
    assert json.loads((tmp_path / "sqlite" / "config.json").read_text())["config"] == \
        json.loads((tmp_path / "pg" / "config.json").read_text())["config"]
    shutil.rmtree(tmp_path / "pg")
