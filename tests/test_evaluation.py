"""`tsad evaluate` rows that read `tsad embed` output and rows that fuse other rows, on the
MSL slice in tests/data (real MiniLM for the embeddings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from models.evaluation import DetectorSpec, EntityScores, fuse_entity
from tests.conftest import DATA_DIR

ROOT = Path(__file__).resolve().parent.parent


def tsad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "msl-w32-s16"
    r = tsad("embed", "--dataset", "msl", "--data-dir", str(DATA_DIR), "--out", str(out),
             "--window", "32", "--stride", "16", "--channels", "0,3", "--pooling", "mean",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "index.json").read_text())["channels"] == [0, 3]
    return out


def test_evaluate_reads_embeddings_and_fuses_rows(embeddings, tmp_path):
    memory = {"detector": "embedding_memory", "params": {"window": 32},
              "embeddings": str(embeddings), "spread": "max"}
    config = {"dataset": "msl", "rows": [
        {"label": "memory c0", "columns": [0], **memory},
        {"label": "memory c0+c3", "columns": [0, 3], **memory},
        {"label": "residual linear", "detector": "residual_linear", "params": {"window": 32},
         "columns": [0]},
        {"label": "fused z", "fuse": ["memory c0", "residual linear"]},
        {"label": "fused rank", "fuse": ["memory c0", "residual linear"], "method": "rank",
         "weights": "equal"},
    ]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    r = tsad("evaluate", "--config", str(path), "--data-dir", str(DATA_DIR),
             "--out", str(tmp_path / "report"), "--jobs", "1")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == [row["label"] for row in config["rows"]]
    for row in rows.values():
        assert all(0.0 <= v <= 1.0 for v in row["metrics"].values()), row
    assert rows["fused z"]["fuse"] == ["memory c0", "residual linear"]
    for row in rows.values():  # each entity's own ranking, beside the concatenated one
        assert set(row["entity_auc"]) == set(report["entities"])
        assert all(v is None or 0.0 <= v <= 1.0 for v in row["entity_auc"].values())
    assert "fused rank" in (tmp_path / "report.md").read_text()


def test_evaluate_names_what_is_wrong_in_a_row(embeddings, tmp_path):
    bad = [
        ({"label": "f", "fuse": ["nowhere"]}, "`fuse` names rows not defined before it"),
        ({"label": "m", "detector": "embedding_memory", "embeddings": str(embeddings),
          "columns": [5]}, "columns [5] are not in"),
    ]
    memory = {"label": "m0", "detector": "embedding_memory", "embeddings": str(embeddings),
              "columns": [0]}
    bad.append(([memory, {"label": "r", "rescore": "m0", "params": {"k": 3}}],
                "rescore needs a row that fits a detector"))
    for row, message in bad:
        path = tmp_path / "bad.yaml"
        rows = row if isinstance(row, list) else [row]
        path.write_text(yaml.safe_dump({"dataset": "msl", "rows": rows}))
        r = tsad("evaluate", "--config", str(path), "--data-dir", str(DATA_DIR),
                 "--out", str(tmp_path / "bad"))
        assert r.returncode != 0 and message in r.stderr, r.stderr


def test_fusion_weights_come_from_training_scores_only():
    rng = np.random.default_rng(0)
    steady = EntityScores(test=np.r_[np.zeros(90), np.full(10, 5.0)],
                          calibration=rng.standard_normal(500))
    jumpy = EntityScores(test=np.r_[np.full(90, 3.0), np.zeros(10)],  # wrong on test
                         calibration=rng.standard_t(1, 500))  # and wild on training data
    fused = fuse_entity(DetectorSpec("f", fuse=["a", "b"]), [steady, jumpy]).test
    # the steady member dominates: its anomalies stay on top
    assert fused[90:].min() > fused[:90].max()
    equal = fuse_entity(DetectorSpec("f", fuse=["a", "b"], weights="equal"),
                        [steady, jumpy]).test
    assert not np.allclose(fused, equal)
    with pytest.raises(ValueError, match="calibration"):
        fuse_entity(DetectorSpec("f", fuse=["a"]), [EntityScores(np.zeros(3), np.zeros(0))])


def test_any_folder_in_the_msl_layout_with_degenerate_entities(tmp_path):
    """A dataset is named by its folder (SMAP in the MSL layout, any case); --entities picks
    by name; an entity whose training split is shorter than two windows and one whose
    telemetry is constant in training are scored, fused and noted, not crashed on."""
    smap = tmp_path / "data" / "SMAP"
    smap.mkdir(parents=True)
    for name in ("train.npy", "test.npy", "test_label.npy"):
        (smap / name).write_bytes((DATA_DIR / "msl" / name).read_bytes())
    # C-1: 50 training rows (window 32: no room for a held-out tail); C-2 as shipped, its
    # column 0 constant over its 400 training rows
    (smap / "entities.csv").write_text("chan_id,train_start,train_end,test_start,test_end\n"
                                       "C-1,0,50,0,400\nC-2,400,800,400,800\n")
    config = {"dataset": "smap", "rows": [
        {"label": "residual linear", "detector": "residual_linear", "params": {"window": 32},
         "columns": [0, 1]},
        {"label": "pca", "detector": "pca", "params": {"window": 32}, "columns": [0, 1]},
        {"label": "fused", "fuse": ["residual linear", "pca"]},
    ]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    r = tsad("evaluate", "--config", str(path), "--data-dir", str(tmp_path / "data"),
             "--entities", "C-2,C-1", "--out", str(tmp_path / "report"), "--jobs", "1")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["entities"] == ["C-2", "C-1"] and report["anchors"] == {}
    notes = {(n["row"], n["entity"], n["note"].split(":")[0]) for n in report["notes"]}
    for row in ("residual linear", "pca"):
        assert (row, "C-2", "channels [0] constant in training") in notes, notes
        assert (row, "C-1", "training split of 50 points is shorter than two windows (64)"
                ) in notes, notes
    for row in report["rows"]:
        assert all(np.isfinite(v) for v in row["metrics"].values()), row
    assert "Degenerate entities" in (tmp_path / "report.md").read_text()


def test_missing_data_and_embeddings_are_one_line_naming_the_fix(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    row = {"label": "m", "detector": "embedding_memory", "params": {"window": 32},
           "embeddings": str(tmp_path / "emb")}
    emb_config = tmp_path / "emb.yaml"
    emb_config.write_text(yaml.safe_dump({"dataset": "msl", "rows": [row]}))
    lin_config = tmp_path / "lin.yaml"
    lin_config.write_text(yaml.safe_dump({"dataset": "msl", "rows": [
        {"label": "r", "detector": "residual_linear"}]}))
    train_config = tmp_path / "train.yaml"
    train_config.write_text(yaml.safe_dump({"name": "x", "detector": "residual_linear",
                                            "data": {"dataset": "msl"}}))
    cases = [
        (("evaluate", "--config", str(emb_config), "--data-dir", str(DATA_DIR), "--out",
          str(tmp_path / "r")), "`tsad embed --dataset msl"),
        (("evaluate", "--config", str(lin_config), "--data-dir", nowhere, "--out",
          str(tmp_path / "r")), "--data-dir tests/data"),
        (("embed", "--dataset", "msl", "--data-dir", nowhere, "--out", str(tmp_path / "e")),
         "--data-dir tests/data"),
        (("train", "--config", str(train_config), "--data-dir", nowhere, "--out",
          str(tmp_path / "a")), "--data-dir tests/data"),
    ]
    for args, fix in cases:
        r = tsad(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tsad {args[0]}: "), r.stderr
        assert fix in lines[0], lines[0]


def test_embed_takes_entities_by_name_from_any_msl_layout_folder():
    from models.lm.embed_cli import load_streams

    streams, chans = load_streams("MSL", str(DATA_DIR), None, "C-2")
    assert chans == [0]
    assert [(s.name, s.split) for s in streams] == [("C-2", "train"), ("C-2", "test")]
    with pytest.raises(SystemExit, match="--entities"):
        load_streams("msl", str(DATA_DIR), None, "X-9")


def test_a_rescore_row_scores_the_fitted_models_again_without_refitting(monkeypatch):
    """How channels combine (``aggregate``) is a scoring-only setting: rescoring mean models
    with max gives what fresh max models give, from the one fit of the source row."""
    from models.data import load_msl
    from models.detectors.residual_linear import ResidualLinear
    from models.evaluation import score_entity_full

    entity = load_msl(DATA_DIR)[0]
    train, test = entity.train.astype(np.float64), entity.test.astype(np.float64)
    row = {"columns": [0, 1, 2], "stride": 4, "spread": "max"}
    source = DetectorSpec("mean", "residual_linear", {"window": 32}, **row)
    fits = []
    original = ResidualLinear._fit
    monkeypatch.setattr(ResidualLinear, "_fit",
                        lambda self, x: (fits.append(1), original(self, x))[1])
    fitted = score_entity_full(source, train, test, keep_models=True)
    assert len(fits) == 2 and set(fitted.models) == {"full", "held"}  # held-out + full
    again = score_entity_full(DetectorSpec("max", params={"aggregate": "max"},
                                           rescore="mean", **row), train, test, fitted=fitted)
    assert len(fits) == 2 and not again.models  # no fit, nothing kept
    fresh = score_entity_full(DetectorSpec("max fresh", "residual_linear",
                                           {"window": 32, "aggregate": "max"}, **row),
                              train, test)
    np.testing.assert_array_equal(again.test, fresh.test)
    np.testing.assert_array_equal(again.calibration, fresh.calibration)
    assert not np.array_equal(again.test, fitted.test)
    assert fitted.models["full"].config.aggregate == "mean"  # the source is not changed
    with pytest.raises(ValueError, match="unknown config keys"):
        score_entity_full(DetectorSpec("bad", params={"kk": 3}, rescore="mean", **row),
                          train, test, fitted=fitted)


# --- a researcher's loop: the whole config checked first, finished rows kept -------------

def write_config(path: Path, rows: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"dataset": "msl", "rows": rows}, sort_keys=False))
    return path


def test_rows_are_read_whole_each_problem_naming_row_and_key():
    from models.evaluate_config import rows_from, select

    rows = [
        {"label": "residual linear, column 0", "id": "rl", "detector": "residual_linear",
         "params": {"window": 32}, "columns": [0]},
        {"label": "pca", "detector": "pca", "params": {"window": 32, "stide": 4},
         "column": [0]},
        {"label": "spear", "detector": "spaer"},
        {"label": "rl again", "id": "rl", "detector": "residual_linear", "spread": "median"},
        {"label": "fused", "fuse": ["rl", "pca"]},
        {"label": "rescored", "rescore": "rl", "params": {"aggregate": "max"}},
        {"label": "two kinds", "detector": "pca", "fuse": ["rl"]},
    ]
    specs, problems = rows_from({"dataset": "msl", "rows": rows}, "c.yaml")
    assert [s.label for s in specs] == ["residual linear, column 0", "rescored"]
    assert specs[1].rescore == "residual linear, column 0"  # ids resolve to labels
    expected = [
        "c.yaml: row 2 ('pca'): unknown key 'column' (did you mean 'columns'?)",
        "c.yaml: row 2 ('pca'): `params`: pca: unknown config keys ['stide']",
        "c.yaml: row 3 ('spear'): `detector` 'spaer' is not registered (did you mean 'spear'?)",
        "c.yaml: row 4 ('rl again'): `spread` must be one of ['newest', 'max', 'mean'], got "
        "'median'",
        "c.yaml: row 4 ('rl again'): id 'rl' is used by an earlier row",
        "c.yaml: row 5 ('fused'): `fuse` names a row with problems (above)",
        "c.yaml: row 7 ('two kinds'): needs exactly one of `detector`",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert len(problems) == len(expected) and all("\n" not in p for p in problems)

    good, none = rows_from({"rows": [rows[0], {"label": "f", "fuse": ["rl"]},
                                     rows[5] | {"id": "re"}]}, "c.yaml")
    assert not none and good[1].fuse == ["residual linear, column 0"]
    assert [s.label for s in select(good, "f")] == ["residual linear, column 0", "f"]
    assert [s.label for s in select(good, "re")] == ["residual linear, column 0", "rescored"]
    assert [s.label for s in select(good, "1")] == ["residual linear, column 0"]
    with pytest.raises(ValueError, match=r"--rows: \['x'\]"):
        select(good, "x")


def test_a_bad_row_stops_the_run_before_any_row_runs(tmp_path):
    config = write_config(tmp_path / "bad.yaml", [
        {"label": "fine", "detector": "residual_linear", "params": {"window": 32},
         "columns": [0]},
        {"label": "typo", "detector": "pca", "column": [0]},
        {"label": "wide", "detector": "pca", "columns": [0, 9]},
    ])
    work = tmp_path / "work"
    for extra in ((), ("--check",)):
        r = tsad("evaluate", "--config", str(config), "--data-dir", str(DATA_DIR), "--out",
                 str(tmp_path / "report"), "--work", str(work), *extra)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.splitlines() == [
            f"{config}: row 2 ('typo'): unknown key 'column' (did you mean 'columns'?)",
            f"{config}: row 3 ('wide'): `columns` [0, 9]: the msl data has 5 columns (0..4)"]
        assert not work.exists() and not (tmp_path / "report.json").exists()  # nothing ran


@pytest.mark.slow  # seven runs of the command
def test_finished_rows_survive_a_failed_row_and_a_rerun_skips_them(tmp_path):
    """Row 2 fails (a window too long for its validation split); row 1 is saved with its
    metrics and the report names row 2 pending. The next run reads row 1 back, fusion
    rows name members by id, a changed row is computed again, --force computes all."""
    rl = {"label": "residual linear, column 0", "id": "rl", "detector": "residual_linear",
          "params": {"window": 32}, "columns": [0]}
    pca = {"label": "PCA reconstruction, column 0", "id": "pca", "detector": "pca",
           "params": {"window": 32}, "columns": [0], "stride": 4, "spread": "max"}
    fused = {"label": "fused", "fuse": ["rl", "pca"]}
    crash = {"label": "SPEAR, window 300", "detector": "spear", "params": {"window": 300},
             "columns": [0], "stride": 16}
    out, work = tmp_path / "report", tmp_path / "work"

    def evaluate(rows: list[dict], *extra: str) -> subprocess.CompletedProcess:
        config = write_config(tmp_path / "eval.yaml", rows)
        return tsad("evaluate", "--config", str(config), "--data-dir", str(DATA_DIR),
                    "--out", str(out), "--work", str(work), "--jobs", "1", *extra)

    def read_back(r: subprocess.CompletedProcess) -> set[str]:
        return {line.split(": read back")[0].split("tsad.evaluate: ")[1]
                for line in r.stderr.splitlines() if ": read back from" in line}

    first = evaluate([rl, crash])
    assert first.returncode == 1 and "row 'SPEAR, window 300' failed" in first.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert [row["label"] for row in report["rows"]] == [rl["label"]]
    assert report["pending"] == [crash["label"]]
    assert report["rows"][0]["metrics_seconds"] >= 0 and "metrics:" in first.stderr

    again = evaluate([rl, pca, fused])
    assert again.returncode == 0, again.stderr
    assert read_back(again) == {rl["label"]}
    report = json.loads(out.with_suffix(".json").read_text())
    assert [row["label"] for row in report["rows"]] == [rl["label"], pca["label"], "fused"]
    assert report["rows"][2]["fuse"] == [rl["label"], pca["label"]] and "pending" not in report
    assert "seconds (scores + metrics)" in out.with_suffix(".md").read_text()
    first_metrics = {row["label"]: row["metrics"] for row in report["rows"]}

    changed = evaluate([rl, pca | {"stride": 2}, fused], "--rows", "fused")
    assert changed.returncode == 0 and read_back(changed) == {rl["label"]}

    forced = evaluate([rl, pca, fused], "--rows", "rl", "--force")
    assert forced.returncode == 0 and read_back(forced) == set()
    report = json.loads(out.with_suffix(".json").read_text())
    assert [row["label"] for row in report["rows"]] == [rl["label"]]
    assert report["rows"][0]["metrics"] == first_metrics[rl["label"]]  # the same, computed

    rescore = {"label": "residual linear, channels by max", "rescore": "rl",
               "params": {"aggregate": "max"}, "columns": [0]}
    refit = evaluate([rl, rescore])  # rl's fitted models are not saved: it is fitted again
    assert refit.returncode == 0 and read_back(refit) == set(), refit.stderr
    assert read_back(evaluate([rl, rescore])) == {rl["label"], rescore["label"]}

    check = evaluate([rl, pca, fused], "--check")
    assert check.returncode == 0 and "3 rows check out on msl (2 entities): 0 to compute, " \
        "3 finished" in check.stdout, check.stdout
