"""The studies' shared runner (gankit.studies): rows train as Ray tasks, a finished
row is reused, never trained twice."""

import argparse
from pathlib import Path

import numpy as np

from conftest import tiny_config
from gankit.studies import study_out, study_parser, train_rows
from gankit.data import load_data
from gankit.runs import RunDir

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"  # wherever pytest starts


def test_rows_train_in_parallel_on_ray_and_a_finished_row_is_reused(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (128, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 128))
    runs = tmp_path / "runs"
    configs = {name: tiny_config(runs, dataset=f"npz:{tmp_path / 'd.npz'}", epochs=1, name=name, seed=seed)
               for name, seed in (("a", 1), ("b", 2))}
    data = load_data(configs["a"].data)
    args = argparse.Namespace(sequential=False, ray_address="", cpus_per_row=1.0, gpus_per_row=0.0)
    seconds = train_rows(configs, data, runs, args)
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    for name in ("a", "b"):
        assert [r["epoch"] for r in RunDir(runs / name).history()] == [1]
    # Run again (here, without Ray): both rows are finished, so nothing trains again.
    again = train_rows(configs, data, runs, argparse.Namespace(sequential=True, ray_address=""))
    assert again == seconds
    assert [r["epoch"] for r in RunDir(runs / "a").history()] == [1]


def test_studies_write_under_runs_unless_told_otherwise():
    parser = study_parser("x", Path("experiments/configs/dp_sweep_small.json"))
    assert study_out(parser.parse_args([])) == Path("runs/dp_sweep_small")
    assert study_out(parser.parse_args(["--out", "experiments/results/dp_sweep_small"])) == \
        Path("experiments/results/dp_sweep_small")


def test_equal_generator_steps_gives_wgan_five_times_the_epochs(tmp_path):
    from gankit.studies import equal_generator_steps

    configs = {"bce": tiny_config(tmp_path, loss="bce", batch_size=100),
               "wgan": tiny_config(tmp_path, loss="wgan", batch_size=100)}
    epochs = {n: c.train.epochs for n, c in equal_generator_steps(configs, 60_000, 3_000).items()}
    assert epochs == {"bce": 5, "wgan": 25}  # 600 batches an epoch; n_critic 1 and 5


def test_rows_go_to_ray_longest_first_so_no_long_row_starts_last(tmp_path):
    from gankit.studies import equal_generator_steps, longest_first

    configs = {name: tiny_config(tmp_path, loss=name, batch_size=100) for name in ("bce", "wgan", "kl", "wgan-gp")}
    configs = equal_generator_steps(configs, 60_000, 3_000)
    assert list(longest_first(configs)) == ["wgan", "wgan-gp", "bce", "kl"]


def test_every_committed_study_config_validates():
    """A typo in a committed config's option would otherwise surface hours into a study."""
    import json

    from gankit.studies import row_configs

    configs = sorted((EXPERIMENTS / "configs").glob("*.json"))
    assert configs
    for path in configs:
        spec = json.loads(path.read_text())
        base = dict(spec["base"])
        if path.name.startswith("federated"):
            base["mode"] = "federated"  # what federated_study.py adds
        rows = {name: {k: v for k, v in o.items() if k != "centralized"}  # as federated_study.py
                for name, o in spec["rows"].items()}
        built = row_configs({**spec, "rows": rows}, base, "", [], Path("runs") / path.stem)
        assert set(built) == set(spec["rows"]), path.name
        for entry in spec.get("include", []):  # rows tabled from another study's results
            other = json.loads((path.parent / entry["config"]).read_text())
            assert set(entry["rows"]) <= set(other["rows"]), path.name
            assert (path.parent / entry["results"]).is_dir(), path.name


def test_federated_study_rows_train_on_ray_and_the_table_is_rebuilt_from_committed_evaluations(tmp_path):
    """The rows train as parallel Ray tasks (each federation inline in its task) and a
    finished row is never trained again. Run folders stay out of git: the committed
    evaluations and histories alone rebuild the table and plot on another machine, with the
    same numbers, and never train."""
    import json
    import subprocess
    import sys

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "base": {"dataset": "mnist-5k", "conditional": True, "g_width": 8, "d_width": 8,
                 "batch_size": 16, "clients": 2, "rounds": 2, "local_steps": 2, "eval_every": 1,
                 "eval_samples": 100, "tensorboard": False, "progress": False},
        "evaluation": {"samples": 100, "downstream_epochs": 1},
        "rows": {"iid": {"partition": "iid"}, "skewed": {"partition": "dirichlet", "dirichlet_alpha": 0.5}}}))
    out = tmp_path / "out"
    study = [sys.executable, str(EXPERIMENTS / "federated_study.py"), "--config", str(config), "--out", str(out)]
    done = subprocess.run(study, check=True, capture_output=True, text=True)
    assert "training 2 rows on Ray" in done.stderr
    first = (out / "table.csv").read_text()
    for name in ("iid", "skewed"):
        assert json.loads((out / "evaluations" / f"{name}.json").read_text())["row"]["rounds"] == 2
        assert json.loads((out / "runs" / name / "config.json").read_text())["federated"]["simulation"] == "inline"
    times = json.loads((out / "train_times.json").read_text())
    again = subprocess.run(study + ["--rows", "iid"], check=True, capture_output=True, text=True)
    assert "[iid] reusing the finished run" in again.stderr
    assert json.loads((out / "train_times.json").read_text()) == times  # nothing trained
    assert (out / "table.csv").read_text() == first  # --rows trains; the table keeps every row
    import shutil
    shutil.rmtree(out / "runs")
    (out / "table.csv").unlink()
    done = subprocess.run(study + ["--evaluate-only"], check=True, capture_output=True, text=True)
    assert "committed evaluation is tabled" in done.stderr
    assert (out / "table.csv").read_text() == first
    assert not (out / "runs").exists()  # nothing trained
    # A row whose options changed since its evaluation is not tabled from it.
    spec = json.loads(config.read_text())
    spec["rows"]["iid"]["local_steps"] = 3
    config.write_text(json.dumps(spec))
    done = subprocess.run(study + ["--evaluate-only"], check=True, capture_output=True, text=True)
    assert "measured another configuration" in done.stderr
    assert [r.split(",")[0] for r in (out / "table.csv").read_text().splitlines()[1:]] == ["skewed"]


def test_a_federated_row_held_by_another_process_is_not_trained_twice(tmp_path):
    """Two studies (or Ray tasks) given the same row: the second is refused while the first
    holds the row's folder, and leaves it untouched."""
    import fcntl

    from gankit.errors import UserError
    import pytest

    import gankit.federated_study as study
    row = tmp_path / "runs" / "iid"
    row.mkdir(parents=True)
    (row / "history.jsonl").write_text('{"round": 1}\n')  # another process's first round
    with open(row / ".lock", "a+") as other:  # that process's hold on the folder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        config = tiny_config(tmp_path / "runs", mode="federated", name="iid")
        with pytest.raises(UserError, match="in use by another gankit process"):
            study.train_federated_row("iid", config, None, tmp_path / "runs")
    assert (row / "history.jsonl").read_text() == '{"round": 1}\n'


def test_federated_study_tables_rows_included_from_another_studys_committed_results(tmp_path):
    """The parity table names the client-DP study's rows ("include"): they are tabled from
    that study's committed evaluations, checked against its own config, and a row whose
    options changed there is left out."""
    import csv
    import json
    import subprocess
    import sys

    tiny = {"dataset": "mnist-5k", "conditional": True, "g_width": 8, "d_width": 8, "batch_size": 16,
            "clients": 4, "rounds": 2, "local_steps": 2, "eval_every": 1, "eval_samples": 100,
            "tensorboard": False, "progress": False, "simulation": "inline"}
    evaluation = {"samples": 100, "downstream_epochs": 1}
    other = tmp_path / "configs" / "other.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"base": tiny, "evaluation": evaluation, "rows": {
        "cdp": {"client_dp": "poisson", "fraction_train": 0.5, "client_dp_noise": 1.0, "client_dp_clip": 0.1}}}))
    subprocess.run([sys.executable, str(EXPERIMENTS / "federated_study.py"), "--config", str(other),
                    "--out", str(tmp_path / "results" / "other")], check=True, capture_output=True)
    main = tmp_path / "configs" / "main.json"
    main.write_text(json.dumps({"base": tiny, "evaluation": evaluation, "rows": {"iid": {}},
                                "include": [{"config": "other.json", "results": "../results/other",
                                             "rows": ["cdp"]}]}))
    study = [sys.executable, str(EXPERIMENTS / "federated_study.py"), "--config", str(main), "--out",
             str(tmp_path / "main"), "--evaluate-only"]
    subprocess.run(study, check=True, capture_output=True)
    read = lambda path: list(csv.DictReader(open(path)))  # noqa: E731
    tabled, own = read(tmp_path / "main" / "table.csv"), read(tmp_path / "results" / "other" / "table.csv")
    assert [r["row"] for r in tabled] == ["cdp"]  # "iid" never trained: not tabled
    assert tabled == own and tabled[0]["client_dp"] == "poisson"
    assert (tmp_path / "main" / "client_dp_map.png").stat().st_size > 0
    assert "Rows from other studies" in (tmp_path / "main" / "table.md").read_text()
    spec = json.loads(other.read_text())
    spec["rows"]["cdp"]["client_dp_clip"] = 0.2
    other.write_text(json.dumps(spec))
    done = subprocess.run(study, check=True, capture_output=True, text=True)
    assert "measured another configuration" in done.stderr
    assert read(tmp_path / "main" / "table.csv") == []


def test_the_objective_study_plan_schedules_rows_longest_first():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan", str(EXPERIMENTS / "objective_study_plan.py"))
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    # 5 and 4 start on the two cores; each 3 goes to the core free first: 4 + 3, then 5 + 3.
    assert plan.longest_first_makespan([3, 5, 3, 4], cores=2) == 8
    assert plan.longest_first_makespan([3, 5, 3, 4], cores=4) == 5
    assert plan.longest_first_makespan([3, 5, 3, 4], cores=1) == 15


def test_objective_study_lands_row_by_row_from_committed_evaluations(tmp_path):
    """A row whose evaluation is committed is tabled from it and never trained again (its run
    folder stays out of git), so the study can land a few rows per machine; a row whose
    options changed since is not tabled from the old evaluation."""
    import csv
    import json
    import shutil
    import subprocess
    import sys

    config = tmp_path / "tiny.json"
    spec = {"base": {"dataset": "mnist-5k", "g_width": 8, "d_width": 8, "batch_size": 64, "epochs": 1,
                     "eval_every": 0, "tensorboard": False, "progress": False},
            "evaluation": {"samples": 100, "downstream_epochs": 1, "drs_acceptance": 0.5,
                           "truncation_sigmas": [1.0]},
            "rows": {"bce": {"loss": "bce"}, "lsgan": {"loss": "lsgan"}}}
    config.write_text(json.dumps(spec))
    out = tmp_path / "out"
    study = [sys.executable, str(EXPERIMENTS / "objective_study.py"), "--config", str(config), "--out",
             str(out), "--sequential"]
    read = lambda: list(csv.DictReader(open(out / "table.csv")))  # noqa: E731
    subprocess.run(study + ["--rows", "bce"], check=True, capture_output=True)
    first = read()
    assert {r["row"] for r in first} == {"bce"}
    shutil.rmtree(out / "runs")  # as on a fresh clone: only the committed files remain
    done = subprocess.run(study, check=True, capture_output=True, text=True)
    assert "[bce] training" not in done.stderr and "[lsgan] training" in done.stderr
    both = read()
    assert [r for r in both if r["row"] == "bce"] == first
    assert {r["row"] for r in both} == {"bce", "lsgan"}
    assert (out / "samples.png").stat().st_size > 0 and (out / "histories" / "bce.jsonl").is_file()
    # --rows says what trains; the table keeps every measured row.
    again = subprocess.run(study + ["--rows", "lsgan"], check=True, capture_output=True, text=True)
    assert "[lsgan] training" not in again.stderr and read() == both
    spec["rows"]["bce"]["d_lr"] = 1e-3
    config.write_text(json.dumps(spec))
    shutil.rmtree(out / "runs")
    done = subprocess.run(study + ["--evaluate-only"], check=True, capture_output=True, text=True)
    assert {r["row"] for r in read()} == {"lsgan"}
    assert "Rows not yet measured: bce" in (out / "table.md").read_text()


def test_the_dp_sweep_lands_row_by_row_and_rows_never_shrink_its_table(tmp_path):
    """As the objective study: --rows chooses what trains, a committed evaluation is tabled
    without its run folder, and the committed files are not narrowed to the rows given."""
    import csv
    import json
    import shutil
    import subprocess
    import sys

    config = tmp_path / "tiny.json"
    spec = {"base": {"dataset": "mnist-5k", "g_width": 8, "d_width": 8, "latent_dim": 8,
                     "batch_size": 500, "epochs": 1, "eval_every": 0, "tensorboard": False,
                     "progress": False},
            "evaluation": {"samples": 100, "downstream_epochs": 0, "audit_samples": 100},
            "rows": {"eps8": {"mode": "dp", "target_epsilon": 8}, "non-private": {"mode": "standard"}}}
    config.write_text(json.dumps(spec))
    out = tmp_path / "out"
    sweep = [sys.executable, str(EXPERIMENTS / "dp_sweep.py"), "--config", str(config), "--out", str(out),
             "--sequential"]
    read = lambda: {r["row"]: r for r in csv.DictReader(open(out / "table.csv"))}  # noqa: E731
    subprocess.run(sweep + ["--rows", "eps8"], check=True, capture_output=True)
    first = read()
    assert set(first) == {"eps8"} and 0 < float(first["eps8"]["epsilon"]) <= 8
    assert "Rows not yet measured: non-private" in (out / "table.md").read_text()
    shutil.rmtree(out / "runs")  # as on a fresh clone: only the committed files remain
    done = subprocess.run(sweep + ["--rows", "non-private"], check=True, capture_output=True, text=True)
    assert "[eps8] training" not in done.stderr and "[non-private] training" in done.stderr
    both = read()
    assert both["eps8"] == first["eps8"] and both["non-private"]["epsilon"] == "inf"
    assert (out / "samples" / "eps8.png").is_file() and (out / "samples" / "non-private.png").is_file()
    again = subprocess.run(sweep + ["--evaluate-only"], check=True, capture_output=True, text=True)
    assert "] training" not in again.stderr and read() == both


def test_the_objective_study_answers_its_seed_questions_from_its_table():

    import gankit.objective_study as study
    row = lambda name, drs, p, r, fid: {"row": name, "drs": drs, "precision": p, "recall": r,  # noqa: E731
                                        "f1": 2 * p * r / (p + r), "fid": fid}
    table = [row("bce", "no", 0.60, 0.50, 20.0), row("bce", "yes", 0.65, 0.45, 15.0),
             row("kl", "no", 0.55, 0.58, 25.0), row("kl", "yes", 0.54, 0.50, 27.0),
             row("rkl", "no", 0.70, 0.40, 30.0),
             row("wgan-gp", "no", 0.58, 0.60, 18.0), row("wgan-gp", "yes", 0.62, 0.57, 16.0)]
    kl, drs, best = study.seed_answers(table)
    assert "KL's recall is 0.580 (+0.080, higher)" in kl
    assert "reverse KL's precision 0.700 (+0.100, higher)" in kl
    # bce and wgan-gp lower their FID with DRS, kl does not; the same two gain precision.
    assert "lowers FID for 2 of 3 rows (bce, wgan-gp)" in drs and "raises precision for 2 of 3 (bce, wgan-gp)" in drs
    assert "the best entry is bce + DRS (15.0)" in best
    assert "wgan-gp + DRS is number 2 of 7 at FID 16.0" in best
    assert "By F1 of precision and recall the best is wgan-gp + DRS (0.594)" in best
    # A class-conditional row leads, and the objectives are also ranked without it.
    table.append(row("conditional", "no", 0.77, 0.77, 2.0))
    *_, best = study.seed_answers(table, frozenset({"conditional", "cgan-other"}))
    assert "By FID the best entry is conditional (2.0); wgan-gp + DRS is number 3 of 8" in best
    assert ("Among the unconditional rows (leaving out conditional, which is given each sample's "
            "label): by FID the best entry is bce + DRS (15.0); wgan-gp + DRS is number 2 of 7") in best
    assert best.endswith("By F1 of precision and recall the best is wgan-gp + DRS (0.594).")
    waiting = study.seed_answers([row("bce", "no", 0.6, 0.5, 20.0)])
    assert "Needs the bce, kl and rkl rows" in waiting[0] and "not measured yet" in waiting[-1]


def test_rows_on_a_gpu_reserve_a_share_of_it_by_default(tmp_path):
    """A Ray task that reserves no GPU sees none, so rows that train on cuda get a GPU share
    unless told otherwise, and an explicit 0 for them is refused; CPU rows reserve none."""
    import pytest

    from gankit.studies import GPU_SHARE, gpus_per_row

    gpu_rows = {"a": tiny_config(tmp_path, device="cuda")}
    cpu_rows = {"a": tiny_config(tmp_path, device="cpu")}
    assert gpus_per_row(argparse.Namespace(gpus_per_row=None), gpu_rows) == GPU_SHARE
    assert gpus_per_row(argparse.Namespace(gpus_per_row=0.5), gpu_rows) == 0.5
    assert gpus_per_row(argparse.Namespace(gpus_per_row=None), cpu_rows) == 0.0
    from gankit.errors import StudyError

    with pytest.raises(StudyError, match="hides the GPU"):
        gpus_per_row(argparse.Namespace(gpus_per_row=0.0), gpu_rows)


def test_a_users_mistake_stops_every_study_with_one_line_and_exit_code_2(tmp_path):
    """A missing data folder, a bad --set value or a config that is no JSON is the user's
    mistake, not a bug: one line on stderr naming the problem, exit code 2, no traceback,
    and nothing trained or written."""
    import json
    import subprocess
    import sys

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "base": {"dataset": "mnist", "data_root": str(tmp_path / "no-mnist-here"), "epochs": 1},
        "evaluation": {"samples": 100, "downstream_epochs": 1, "drs_acceptance": 0.5,
                       "truncation_sigmas": [1.0]},
        "rows": {"bce": {"loss": "bce"}}}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"base": {')
    out = tmp_path / "out"
    objective = [str(EXPERIMENTS / "objective_study.py"), "--out", str(out), "--sequential"]
    cases = [
        (objective + ["--config", str(config)], "mnist is not in"),
        (objective + ["--config", str(config), "--set", "epochs=-1"], "epochs"),
        (objective + ["--config", str(broken)], "not valid JSON"),
        (objective + ["--config", str(tmp_path / "missing.json")], "missing.json"),
        (objective + ["--config", str(config), "--rows", "nope"], "unknown rows ['nope']"),
        (objective + ["--config", str(config), "--set", "epochs"], "--set takes OPTION=VALUE"),
        ([str(EXPERIMENTS / "objective_study_plan.py"), "--config", str(config)], "mnist is not in"),
        ([str(EXPERIMENTS / "dp_sweep.py"), "--config", str(broken), "--out", str(out)], "not valid JSON"),
        ([str(EXPERIMENTS / "federated_study.py"), "--config", str(broken), "--out", str(out)], "not valid JSON"),
        ([str(EXPERIMENTS / "dp_mnist.py"), "--config", str(broken), "--out", str(out)], "not valid JSON"),
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: each imports torch
        runs = list(pool.map(lambda argv: subprocess.run([sys.executable] + argv, capture_output=True,
                                                         text=True), [argv for argv, _ in cases]))
    for (argv, problem), done in zip(cases, runs):
        script = Path(argv[0]).name
        assert done.returncode == 2, (argv, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (argv, done.stderr[-2000:])
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"{script}: error: ") and problem in last, (argv, last)
    assert not (out / "runs").exists() and not (out / "table.csv").exists()
