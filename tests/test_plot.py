"""`polybyte plot`: learning curves from run folders' metrics.csv, codecs from an eval report."""

from __future__ import annotations

import csv
import json

from PIL import Image

from polybyte.pipelines import cli, plot


def _run(folder, rows: list[dict], version: int = 0) -> None:
    path = folder / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


def test_val_curves_take_time_and_flops_of_the_last_training_row():
    rows = [
        {"step": 9, plot.TIME: 10.0, plot.FLOPS: 1e12},
        {"step": 9, "val/bpb_text": 3.0},
        {"step": 19, plot.TIME: 20.0, plot.FLOPS: 2e12},
        {"step": 19, "val/bpb_text": 2.5, "val/bpb_image": 5.0},
    ]
    curves = plot.val_curves(rows)
    assert curves == {"text": [(9, 10.0, 1e12, 3.0), (19, 20.0, 2e12, 2.5)], "image": [(19, 20.0, 2e12, 5.0)]}


def test_plot_cli_draws_runs_and_codecs(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 0.9)):
        rows = [{"step": s, plot.TIME: s * 2.0, plot.FLOPS: s * 1e12} for s in (9, 19, 29)]
        rows += [{"step": s, "val/bpb_text": scale * (4 - s / 10)} for s in (9, 19, 29)]
        _run(tmp_path / name, rows[:3] + rows[3:5])
        _run(tmp_path / name, rows[2:3] + rows[5:], version=1)  # a resume: a second csv version
    report = {"modalities": {"text": {"codecs": {"gzip -9": {"bpb": 2.9}, "xz -9e": {"skipped": "absent"}}}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "curves.png"
    argv = ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--codecs", str(tmp_path / "report.json")]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "6 validation points of 2 run(s)" in capsys.readouterr().out
    assert Image.open(out).size[0] > 500
    assert plot.codec_lines(report) == {"text": {"gzip -9": 2.9}}


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no csv/version_*/metrics.csv" in capsys.readouterr().err
    _run(tmp_path / "r", [{"step": 9, plot.TIME: 1.0}])
    assert cli.main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no val/bpb_* rows in r" in capsys.readouterr().err
