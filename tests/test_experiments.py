"""End-to-end runs of the experiment scripts on real MNIST with tiny budgets."""

import json
import pathlib
import sys

import matplotlib.image
import numpy as np
import pytest

from conftest import REPO
from hoyertrim import pipeline

sys.path.insert(0, str(REPO / "experiments"))

import run  # noqa: E402


@pytest.mark.slow
def test_a_named_pipeline_runs_its_stages_and_evaluates_each_point_once(tiny_data_root, tmp_path,
                                                                        monkeypatch):
    """`run.py` end to end on the tiny stand-in data: a dense stage, a peer pruned to the
    counts of a Net-Trim chain (`like`, run first) and a fine-tune; the results file names every
    stage's directory and holds one test evaluation per point; a second run reuses every stage."""
    dense = ("train", {"model": "lenet300100", "epochs": 1})
    nettrim_chain = [dense, ("nettrim", {"kept_fraction": 0.3, "scheme": "parallel",
                                         "samples": 300, "heldout": 100, "maxiter": 100})]
    monkeypatch.setitem(run.CONFIGS, "tiny", [
        dense, ("nettrim", {"like": nettrim_chain, "method": "magnitude", "samples": 300,
                            "heldout": 100}),
        ("finetune", {"epochs": 1, "learning_rate": 1e-3})])
    kwargs = dict(root=tmp_path / "runs", data_dir=tiny_data_root, progress=False,
                  results_dir=tmp_path / "results")
    payload = run.run("tiny", **kwargs)
    assert json.loads((tmp_path / "results" / "tiny.json").read_text()) == \
        json.loads(json.dumps(payload))
    assert [s["stage"] for s in payload["stages"]] == ["train", "nettrim", "finetune"]
    # dense, pruned, fine-tuned: each evaluated once on the 400 test images
    assert [t["examples"] for t in payload["test"]] == [400, 400, 400]
    like = payload["stages"][1]["settings"]["like"]
    assert pathlib.Path(like).parent == tmp_path / "runs" and (pathlib.Path(like) /
                                                                "hoyertrim.json").is_file()
    # magnitude met the Net-Trim chain's per-layer counts exactly
    nettrim_layers = json.loads((pathlib.Path(like) / "hoyertrim.json").read_text())
    pruned = payload["stages"][1]["results"]["layers"]
    assert set(pruned) == set(nettrim_layers["results"]["layers"])
    for name, layer in pruned.items():
        assert layer["kept_weights"] == nettrim_layers["results"]["layers"][name]["kept_weights"]
    again = run.run("tiny", **kwargs)
    assert [s["directory"] for s in again["stages"]] == [s["directory"] for s in payload["stages"]]
    assert [t["accuracy"] for t in again["test"]] == [t["accuracy"] for t in payload["test"]]


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
    plot = matplotlib.image.imread(results.with_suffix(".png"))  # a drawn figure, not blank
    assert plot.shape[0] > 200 and len(np.unique(plot.reshape(-1, plot.shape[-1]), axis=0)) > 20
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
            kwargs = pipeline.training_kwargs(stage, settings)  # what run_stages passes
            unknown = set(kwargs) - set(accepted) - ({"model"} if stage == "train" else set())
            assert not unknown, f"{name}: {stage} gets {unknown}"
            teacher = settings.get("teacher")
            if isinstance(teacher, tuple):
                assert teacher[0] == "train" and settings.get("distill"), name
            if isinstance(settings.get("like"), list):
                check(f"{name} (like)", settings["like"])

    for name, stages in run.CONFIGS.items():
        check(name, stages)


def _fake_run(accuracies, kept=0.25, layers=None, settings=None):
    """The parts of a `run.py` results file that `mnist_tables.py` reads."""
    pruned = {"kept_fraction": kept, "heldout": {"top1_agreement": 0.95,
                                                   "logits_relative_error": 0.125},
              "layers": layers or {"dense0": {"kept_fraction": kept}}}
    return {"test": [{"accuracy": a} for a in accuracies],
            "stages": [{"results": {}}, {"results": pruned, "settings": settings or {}}]}


def test_mnist_tables_fill_their_markers_from_the_results_files(tmp_path):
    import mnist_tables

    results = tmp_path / "pipelines"
    results.mkdir()
    runs = {"peers_wanda_lenet300100_90": _fake_run([0.983, 0.3812, 0.9694]),
            "peers_sparsegpt_lenet300100_2to4": _fake_run([0.983, 0.98, 0.981], kept=0.462),
            "epsilon_cascade_lenet300100_0.3": _fake_run([0.983, 0.9457, 0.9786], kept=0.1061),
            "epsilon_magnitude_cascade_lenet300100_0.3": _fake_run([0.983, 0.8103, 0.9793]),
            "user_conv_bn_cascade": _fake_run(
                [0.9899, 0.988], kept=0.0715, settings={"epsilon": 0.1},
                layers={"Conv_1": {"program": "relu", "kept_fraction": 0.331, "epsilon": 0.1465,
                                   "measured": 0.1446, "heldout_measured": 0.1485}})}
    for name, payload in runs.items():
        (results / f"{name}.json").write_text(json.dumps(payload))
    page = tmp_path / "page.md"
    markers = "".join(f"<!-- {m} table start -->\nstale\n<!-- {m} table end -->\nkept {m}\n"
                      for m in ("peers", "epsilon", "user"))
    page.write_text("# title\n" + markers)
    assert mnist_tables.main(["--results", str(results), "--out", str(page)]) == 0
    text = page.read_text()
    assert "stale" not in text and text.startswith("# title\n") and "kept user" in text
    assert "| 90% | – | – | – | 38.12 → 96.94 | – |" in text
    assert "| 2:4 | – | – | 98.00 → 98.10 (46.2% kept) | – | – |" in text
    assert "| cascade | 0.3 | 10.61 (10.6) | 94.57 | 81.03 | 97.86 / 97.93 | 95.0% / 95.0% |" in text
    assert ("| cascade | 0.1 | 7.15 | 98.99 → 98.80 | 95.0% | 0.125 | "
            "Conv_1: relu, 33.1%, 0.1465 / 0.1446 / 0.1485 |") in text
    (results / "user_conv_bn_cascade.json").unlink()  # a table with no results is an error
    with pytest.raises(SystemExit, match="No results for the user table"):
        mnist_tables.main(["--results", str(results), "--out", str(page)])


def test_regnets_table_reads_the_pipelines_results(tmp_path):
    """The committed regnets results: each row from its Net-Trim pipeline and the magnitude
    pipeline that matched its per-layer counts (`--like`), which keeps exactly as many weights."""
    import regnets_table

    rows = regnets_table.main(["--results", str(REPO / "results" / "pipelines"),
                               "--out", str(tmp_path / "regnets.json")])
    assert set(rows) == set(regnets_table.NAMES)
    for row in rows.values():
        assert row["magnitude_kept_fraction"] == pytest.approx(row["kept_fraction"], abs=1e-12)
        assert 0.9 < row["nettrim_test"] <= 1 and 0.9 < row["magnitude_same_counts_test"] <= 1
    assert json.loads((tmp_path / "regnets.json").read_text()) == json.loads(json.dumps(rows))
    assert "| + L1; Net-Trim + re-fit | 98.46 | 3.84 (" in regnets_table.table(rows)


def test_resnet_table_reads_stages_flops_and_compact_weights(tmp_path):
    import resnet_table

    def entry(stage, accuracy, structured, architecture):
        layers = [{"dense_flops": 100, "structured_flops": s} for s in structured]
        return {"stage": stage, "accuracy": accuracy,
                "sparsity": {"layers": layers, "architecture": architecture, "weights": 1000}}

    results = tmp_path / "pipelines"
    results.mkdir()
    run = {"test": [entry("train", 0.93, (100, 100), "16-16"),
                    entry("prune", 0.80, (40, 40), "6-16"),
                    entry("finetune", 0.925, (40, 40), "6-16")],
           "stages": [{"stage": "train", "results": {}},
                      {"stage": "compact", "results": {"weights_stored": 321}}]}
    (results / "ghs_resnet20_a0.01.json").write_text(json.dumps(run))
    page = tmp_path / "page.md"
    page.write_text("# structured\n")
    assert resnet_table.main(["--results", str(results), "--out", str(page),
                              "--plot", str(tmp_path / "frontier.png")]) == 0
    text = page.read_text()
    assert text.startswith("# structured\n") and "<!-- resnet20 table end -->" in text
    assert "| dense ResNet-20 (10 epochs) | 93.00% | – | 1.00x | 16-16 | 1,000 |" in text
    assert "80.00% (prune) → 92.50% (finetune) | -0.50 | 2.50x | 6-16 | 321 |" in text
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="No ResNet-20 results"):
        resnet_table.main(["--results", str(tmp_path / "none"), "--out", str(page)])
