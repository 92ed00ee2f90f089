"""gankit compare: runs side by side, read from their folders."""

import csv
import io
import json

from gankit import cli
from gankit.config import Config


def fake_run(root, name, history, **options):
    path = root / name
    path.mkdir()
    Config().updated({"name": name, **options}).save(path / "config.json")
    (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return path


def test_compare_tables_last_and_best_in_each_metrics_direction_and_plots(tmp_path, capsys):
    public = fake_run(tmp_path, "public", [
        {"epoch": 1, "fid": 80.0, "precision": 0.5, "recall": 0.2, "train_time_s": 10.0},
        {"epoch": 2, "fid": 60.0, "precision": 0.7, "recall": 0.1, "train_time_s": 20.0},
        {"epoch": 3, "fid": 70.0, "precision": 0.6, "recall": 0.3, "train_time_s": 30.0}], epochs=3)
    private = fake_run(tmp_path, "private", [
        {"epoch": 1, "fid": 200.0, "precision": 0.3, "recall": 0.0, "epsilon": 4.2, "delta": 1e-5,
         "train_time_s": 50.0}], mode="dp", epochs=5, target_epsilon=8.0)
    plot = tmp_path / "cmp.png"
    assert cli.main(["compare", str(public), str(private), "--format", "csv", "--plot", str(plot)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["public", "private"]
    a, b = rows
    # Last values, and the best over the history: lowest FID, highest precision and recall.
    assert (float(a["fid"]), float(a["best_fid"])) == (70.0, 60.0)
    assert (float(a["precision"]), float(a["best_precision"])) == (0.6, 0.7)
    assert float(a["best_recall"]) == 0.3 and a["done"] == "3/3 epochs" and float(a["train_time_s"]) == 30.0
    assert a["epsilon"] == "inf" and a["private"] == "nothing (not private)"
    assert float(b["epsilon"]) == 4.2 and b["private"] == "each training image" and b["done"] == "1/5 epochs"
    assert plot.stat().st_size > 10_000
    assert cli.main(["compare", str(public), "--out", str(tmp_path / "t.md")]) == 0
    assert "| public | standard |" in (tmp_path / "t.md").read_text()


def test_compare_refuses_what_is_not_a_run_or_a_metric(tmp_path, capsys):
    run = fake_run(tmp_path, "r", [{"epoch": 1, "fid": 1.0}])
    assert cli.main(["compare", str(tmp_path / "nothing")]) == 2
    assert cli.main(["compare", str(run), "--metric", "g_loss"]) == 2
    assert cli.main(["compare", str(run), "--format", "xml"]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "unknown --metric 'g_loss'" in err and "Traceback" not in err


def test_the_plot_names_non_private_runs_and_separates_labels_at_one_point(tmp_path):
    import matplotlib.pyplot as plt

    from gankit.compare import figure, read_runs, summary

    paths = [fake_run(tmp_path, "public", [{"epoch": 1, "fid": 50.0, "precision": 0.0, "recall": 0.0}]),
             fake_run(tmp_path, "eps10", [{"epoch": 1, "fid": 80.0, "precision": 0.0, "recall": 0.0,
                                           "epsilon": 10.0, "delta": 1e-5}], mode="dp", target_epsilon=10.0),
             fake_run(tmp_path, "eps1", [{"epoch": 1, "fid": 90.0, "precision": 0.0, "recall": 0.0,
                                          "epsilon": 1.0, "delta": 1e-5}], mode="dp", target_epsilon=1.0)]
    runs = read_runs(paths)
    fig = figure(runs, [summary(r) for r in runs])
    _, ax_pr, ax_eps = fig.axes
    # The non-private run sits at twice the largest epsilon, labelled as not private, not as 20.
    labels = {tick.get_text(): x for tick, x in zip(ax_eps.get_xticklabels(), ax_eps.get_xticks())}
    assert labels == {"1": 1.0, "10": 10.0, "not\nprivate": 20.0}
    # Three runs at precision = recall = 0: three labels, each at its own height.
    offsets = sorted(text.xyann[1] for text in ax_pr.texts)
    assert offsets == [3, 12, 21]
    plt.close(fig)
