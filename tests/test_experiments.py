"""End-to-end runs of the experiment scripts on real MNIST with tiny budgets."""

import json
import pathlib
import shutil
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))

import deephoyer_mnist  # noqa: E402
import nettrim_mnist  # noqa: E402
import train_dense  # noqa: E402


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_root):
    workdir = tmp_path_factory.mktemp("dense")
    results = train_dense.main(["--model", "lenet300100", "--epochs", "2", "--data-dir",
                                str(data_root), "--workdir", str(workdir), "--no-progress"])
    return workdir, results


def test_train_dense_writes_results_and_checkpoints(dense_run):
    workdir, results = dense_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["parameters"] == 266_610
    assert saved["test_accuracy"] == results["test_accuracy"] > 0.95
    assert (workdir / "checkpoints").is_dir()
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2


def test_deephoyer_pipeline_runs_and_reports(dense_run, data_root, tmp_path):
    dense_dir, _ = dense_run
    points = deephoyer_mnist.main([
        "--model", "lenet300100", "--strength", "1e-4", "--threshold-scale", "0.3",
        "--reg-epochs", "1", "--finetune-epochs", "1", "--baseline", "--data-dir",
        str(data_root), "--dense-workdir", str(dense_dir), "--workdir", str(tmp_path),
        "--no-progress"])
    methods = [p["method"] for p in points]
    assert methods == ["hoyer_square", "magnitude"]
    hs, magnitude = points
    assert hs["compression"] > 1.5
    # The baseline keeps exactly the same number of weights in every layer.
    assert [l["kept_weights"] for l in hs["report"]["layers"]] == [
        l["kept_weights"] for l in magnitude["report"]["layers"]]
    assert (tmp_path / "results.json").exists()

    # Another rule and a distilled fine-tune in the same workdir: the regularized stage is reused,
    # the new points are added beside the old ones, in their own directories.
    points = deephoyer_mnist.main([
        "--model", "lenet300100", "--strength", "1e-4", "--threshold-scale", "0.3",
        "--prune-rule", "group_std", "--group-threshold", "0.05", "--distill",
        "--reg-epochs", "1", "--finetune-epochs", "1", "--data-dir", str(data_root),
        "--dense-workdir", str(dense_dir), "--workdir", str(tmp_path), "--no-progress"])
    assert [(p["method"], p.get("prune_rule", "std"), p.get("distill", False))
            for p in points] == [("hoyer_square", "std", False), ("magnitude", "std", False),
                                 ("hoyer_square", "group_std", True)]
    assert (tmp_path / "ft_a0.0001_s0.3_group_std_distill").is_dir()
    # group_std prunes at least what the std rule alone prunes.
    assert points[2]["compression"] >= hs["compression"]


def test_nettrim_experiment_runs(dense_run, data_root, tmp_path):
    dense_dir, _ = dense_run
    points = nettrim_mnist.main([
        "--model", "lenet300100", "--epsilon", "0.3", "--scheme", "parallel", "--samples", "600",
        "--maxiter", "50", "--finetune-epochs", "1", "--data-dir", str(data_root),
        "--dense-workdir", str(dense_dir), "--workdir", str(tmp_path), "--no-progress"])
    (point,) = points
    assert 0 < point["kept_fraction"] < 1
    assert all(layer["discrepancy"] <= 0.3 for layer in point["layers"].values())
    assert (tmp_path / "accuracy_vs_kept.png").exists()
    assert (tmp_path / "pruned" / "parallel_eps0.3").is_dir()

    with pytest.raises(SystemExit, match="--distill"):
        nettrim_mnist.main([
            "--model", "lenet300100", "--epsilon", "0.3", "--scheme", "parallel", "--distill",
            "--data-dir", str(data_root), "--dense-workdir", str(dense_dir),
            "--workdir", str(tmp_path), "--no-progress"])
    # A workdir holding a solved network reuses it instead of solving again.
    other = tmp_path / "distilled"
    shutil.copytree(tmp_path / "pruned", other / "pruned")
    (again,) = nettrim_mnist.main([
        "--model", "lenet300100", "--epsilon", "0.3", "--scheme", "parallel", "--distill",
        "--finetune-epochs", "1", "--data-dir", str(data_root), "--dense-workdir",
        str(dense_dir), "--workdir", str(other), "--no-progress"])
    assert again["kept_fraction"] == point["kept_fraction"] and again["distill"]
    assert again["nettrim"] == point["nettrim"]


@pytest.mark.slow
def test_error_propagation_experiment_measures_within_its_bounds(data_root, tmp_path):
    import nettrim_error_propagation
    results = tmp_path / "propagation.json"
    payload = nettrim_error_propagation.main([
        "--models", "lenet300100", "--dense-epochs", "1", "--epsilons", "0.1", "--samples", "400",
        "--heldout", "200", "--root", str(tmp_path / "runs"), "--results", str(results),
        "--data-dir", str(data_root), "--no-progress"])
    assert json.loads(results.read_text()) == json.loads(json.dumps(payload))
    assert results.with_suffix(".png").exists()
    by_scheme = {p["scheme"]: p for p in payload["points"]}
    assert set(by_scheme) == {"parallel", "cascade"}
    for layer in by_scheme["parallel"]["layers"]:  # the propagation bound holds at every layer
        assert 0 < layer["measured"] <= layer["parallel_bound"] * (1 + 1e-5)
    for layer in by_scheme["cascade"]["layers"]:  # the cascade certificate is network-level
        assert 0 < layer["measured"] <= layer["epsilon"] * (1 + 1e-4)
        assert layer["measured"] <= layer["cascade_bound"] * (1 + 1e-5)


def _point(penalty, compression, val_error, test_error):
    return {"penalty": penalty, "strength": 1e-4, "threshold": 0.1, "val_error": val_error,
            "test_error": test_error, "compression": compression,
            "flops_reduction_structured": 1.0, "architecture": "1-1"}


def test_regularizer_frontier_selects_on_validation_only():
    import deephoyer_regularizers
    points = [_point("l1", 10, 2.0, 1.0), _point("l1", 40, 2.25, 1.0),
              # most compressed and best on test, but over the validation tolerance
              _point("l1", 90, 2.35, 0.5),
              _point("hoyer", 50, 3.0, 1.0)]
    rows = deephoyer_regularizers.frontier(points, dense_val_error=2.0, tolerance=0.3)
    assert [r["penalty"] for r in rows] == ["l1", "hoyer"]
    assert rows[0]["point"]["compression"] == 40 and rows[1]["point"] is None
    table = deephoyer_regularizers.markdown("lenet300100", {"val_error": 2.0, "test_error": 1.5},
                                            points, [0.3])
    assert "| L1 | 0.0001 | 0.1 | 40.0x |" in table and "| Hoyer | — | — | none qualifies" in table


@pytest.mark.slow
def test_regularizer_comparison_writes_its_points_frontier_and_plot(data_root, tmp_path):
    import deephoyer_regularizers
    results = tmp_path / "regularizers.json"
    payload = deephoyer_regularizers.main([
        "--recipe", "lenet300100", "--dense-epochs", "1", "--penalties", "group_lasso",
        "--strengths", "3e-4", "--thresholds", "0.1", "0.2", "--reg-epochs", "1",
        "--finetune-epochs", "1", "--root", str(tmp_path / "runs"), "--results", str(results),
        "--data-dir", str(data_root), "--no-progress"])
    assert json.loads(results.read_text()) == json.loads(json.dumps(payload))
    assert results.with_suffix(".png").stat().st_size > 0
    assert "| group lasso |" in results.with_suffix(".md").read_text()
    points = payload["points"]
    assert [(p["penalty"], p["threshold"]) for p in points] == [("group_lasso", 0.1),
                                                                 ("group_lasso", 0.2)]
    low, high = points  # one regularized network, pruned at two thresholds
    assert high["compression"] > low["compression"] > 1
    for p in points:  # each point's errors are its own stage's, on 10k test / held-out images
        evaluation = json.loads((pathlib.Path(p["directory"]) / "evaluation-test.json")
                                .read_text())
        assert p["test_error"] == pytest.approx(100 * (1 - evaluation["accuracy"]))
        assert evaluation["examples"] == 10_000


def test_every_pipeline_config_names_only_its_stages_arguments():
    """A typo in `experiments/run.py`'s configs would only surface hours into a run; here each
    stage's settings are checked against its function's signature (a `teacher` given as a
    stage spec is resolved to a directory by `run.run`, so its spec must be a dense `train`; a
    `like` given as a chain is run first, and is checked the same way)."""
    import inspect

    import run

    def check(name, stages):
        assert stages[0][0] == "train", name
        for stage, settings in stages:
            accepted = inspect.signature(run._STAGES[stage]).parameters
            unknown = set(settings) - set(accepted) - ({"model"} if stage == "train" else set())
            assert not unknown, f"{name}: {stage} gets {unknown}"
            teacher = settings.get("teacher")
            if isinstance(teacher, tuple):
                assert teacher[0] == "train" and settings.get("distill"), name
            if isinstance(settings.get("like"), list):
                check(f"{name} (like)", settings["like"])

    for name, stages in run.CONFIGS.items():
        check(name, stages)
