"""The ``hoyertrim`` command and the pipeline stages behind it, on a small stand-in data set
(`tiny_data_root`) and a model defined in a user's own file."""

import json
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hoyertrim
from hoyertrim import cli, pipeline, report
from hoyertrim.data import load_dataset

USER_MODEL = textwrap.dedent("""
    import flax.linen as nn

    class TinyCNN(nn.Module):  # no `train` argument: trained and evaluated as it is
        width: int = 4

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(self.width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
            return nn.Dense(10)(x)
    """)


def run(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_data_root):
    """train → nettrim → compact of the user's model, through the command."""
    work = tmp_path_factory.mktemp("cli")
    (work / "my_models.py").write_text(USER_MODEL)
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    spec = f"{work / 'my_models.py'}:TinyCNN"
    assert cli.main(["train", "--model", spec, "--model-kwargs", '{"width": 6}', "--epochs",
                     "4", "--learning-rate", "3e-3", "--out", str(work / "dense"), *data]) == 0
    assert cli.main(["nettrim", str(work / "dense"), "--epsilon", "0.1", "--samples", "600",
                     "--heldout", "200", "--out", str(work / "trimmed"), *data]) == 0
    assert cli.main(["compact", str(work / "trimmed"), "--out", str(work / "small"), *data]) == 0
    return work


def test_chain_writes_stages_with_provenance(chain):
    dense = pipeline.read_manifest(chain / "dense")
    trimmed = pipeline.read_manifest(chain / "trimmed")
    small = pipeline.read_manifest(chain / "small")
    assert dense["model"] == {"spec": f"{chain / 'my_models.py'}:TinyCNN", "kwargs": {"width": 6}}
    assert dense["results"]["val_accuracy"] > 0.9  # the stand-in data is learnable
    # links are relative to the stage: a chain copied or moved together keeps its own stages
    assert trimmed["parent"] == trimmed["root"] == "../dense"
    assert small["parent"] == "../trimmed" and small["root"] == "../dense"
    assert pipeline.linked(chain / "small", small, "root") == chain / "dense"
    assert trimmed["provenance"]["command"][:3] == ["hoyertrim", "nettrim", str(chain / "dense")]
    assert trimmed["provenance"]["versions"]["jax"] and trimmed["config"]["epsilon"] == 0.1
    for layer in trimmed["results"]["layers"].values():  # certificates measured, not assumed
        assert layer["measured"] <= layer["epsilon_certified"] and layer["lam_path"]
    assert trimmed["results"]["kept_fraction"] < 0.9
    # Compaction really removed units and kept the logits.
    assert small["results"]["weights_stored"] < sum(
        l["weights"] for l in trimmed["results"]["sparsity"]["layers"])
    assert small["results"]["max_logit_difference"] < 1e-4


def test_compact_model_loads_in_a_fresh_process_with_the_same_accuracy(chain, capsys,
                                                                       tiny_data_root):
    status, out, _ = run(capsys, "evaluate", str(chain / "trimmed"), "--data-dir",
                         str(tiny_data_root))
    assert status == 0 and "test accuracy" in out
    masked = json.loads((chain / "trimmed" / "evaluation-test.json").read_text())
    test = load_dataset("mnist", tiny_data_root).test
    np.savez(chain / "test.npz", images=test.images, labels=test.labels)
    code = textwrap.dedent(f"""
        import numpy as np, hoyertrim
        test = np.load({str(chain / "test.npz")!r})
        small = hoyertrim.load({str(chain / "small")!r})
        assert small.params is None and small.compact is not None
        print(np.mean(np.argmax(small.predict(test["images"]), -1) == test["labels"]))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert float(done.stdout.split()[-1]) == pytest.approx(masked["accuracy"], abs=1e-9)
    assert masked["top1_agreement"] > 0.9 and masked["reference"] == str(chain / "dense")


def test_same_command_reuses_the_stage_and_other_settings_are_refused(chain, capsys,
                                                                      tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    network = chain / "trimmed" / "network"
    before = network.stat().st_mtime_ns
    status, out, _ = run(capsys, "nettrim", str(chain / "dense"), "--epsilon", "0.1",
                         "--samples", "600", "--heldout", "200", "--out",
                         str(chain / "trimmed"), *data)
    assert status == 0 and out.startswith("reused") and network.stat().st_mtime_ns == before
    status, _, err = run(capsys, "nettrim", str(chain / "dense"), "--epsilon", "0.2",
                         "--samples", "600", "--out", str(chain / "trimmed"), *data)
    assert status == 1 and "holds another run" in err and "epsilon: 0.1 there, 0.2 asked" in err
    assert len(err.strip().splitlines()) == 1
    assert pipeline.read_manifest(chain / "trimmed")["config"]["epsilon"] == 0.1


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "no_such_model"], "Unknown model 'no_such_model'"),
    (["train", "--model", "missing.py:Net"], "missing.py does not exist"),
    (["train", "--model", "json:Nothing"], "json has no 'Nothing'"),
    (["train", "--model", "os:system", "--model-kwargs", '{"command": "touch {work}/pwned"}'],
     "os:system names a builtin_function_or_method, not a Flax Module class"),
    (["train", "--model", "subprocess:run", "--model-kwargs",
      '{"args": ["touch", "{work}/pwned"]}'], "not a Flax Module class"),
    (["train", "--model", "lenet5", "--model-kwargs", '{"bogus": 1}'], "Cannot build lenet5"),
    (["train", "--model", ":Net"], "names no module or no class"),
    (["train", "--model", "{work}/my_models.py:TinyCNN", "--model-kwargs", '{"width": -1}'],
     "TinyCNN fails on mnist's inputs (shape (2, 28, 28, 1), float32)"),
    (["train", "--model", "lenet300100", "--model-kwargs", '{"num_classes": 5}'],
     "gives outputs of shape (2, 5) per batch of 2; mnist has 10 classes"),
    (["nettrim", "{work}/nowhere"], "does not exist"),
    (["nettrim", "{work}/dense", "--samples", "999999"], "exceeds the 800 training images"),
    (["compact", "{work}/small"], "is a compact model"),
    (["nettrim", "{work}/dense", "--nm", "2:4", "--polish", "1"], "--polish is Net-Trim's"),
    (["prune", "{work}/dense", "--rule", "magnitude", "--value", "1.5"], "needs a value in"),
])
def test_bad_input_is_one_line_and_leaves_no_folder(chain, capsys, tiny_data_root, argv,
                                                    message):
    before = sorted(p.name for p in chain.iterdir())
    out = chain / "should_not_exist"
    argv = [a.replace("{work}", str(chain)) for a in argv]
    status, _, err = run(capsys, *argv, "--out", str(out), "--data-dir", str(tiny_data_root))
    assert status == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in chain.iterdir()) == before


@pytest.mark.parametrize("argv, message", [
    (["train", "--learning-rate", "nan"], "must be a finite number"),
    (["train", "--learning-rate", "-1"], "must be > 0"),
    (["train", "--weight-decay", "-5"], "must be >= 0"),
    (["prune", "x", "--value", "nan"], "must be a finite number"),
    (["nettrim", "x", "--heldout", "-3"], "must be >= 0"),
    (["nettrim", "x", "--kept-fraction", "1.5"], "must be in (0, 1]"),
    (["train", "--data-dir", "/no/such/folder"], "no such folder: /no/such/folder"),
])
def test_wrong_numbers_are_refused_where_they_enter(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_library_refuses_nan_settings_too(tmp_path):
    with pytest.raises(pipeline.StageError, match="finite number > 0"):
        pipeline.train("lenet300100", tmp_path / "a",
                       training=pipeline.Training(learning_rate=float("nan")))
    with pytest.raises(pipeline.StageError, match="finite number >= 0"):
        pipeline.train("lenet300100", tmp_path / "b",
                       training=pipeline.Training(weight_decay=-1.0))
    with pytest.raises(pipeline.StageError, match="needs a value"):
        pipeline.prune_masks({"dense0": {"kernel": np.ones((2, 2))}}, "std", float("nan"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_batch_larger_than_the_training_set_is_one_line(chain, capsys, tiny_data_root):
    status, _, err = run(capsys, "finetune", str(chain / "trimmed"), "--batch-size", "100000",
                         "--epochs", "1", "--out", str(chain / "big_batch"), "--data-dir",
                         str(tiny_data_root), "--no-progress")
    assert status == 1 and "exceeds the" in err and len(err.strip().splitlines()) == 1
    assert not (chain / "big_batch").exists()


def test_argument_errors_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nettrim", "x", "--epsilon", "1.5"])
    assert exit_info.value.code == 2 and "must be in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--model-kwargs", "[1, 2]"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_per_layer_strength_is_parsed_and_refused_when_wrong(capsys):
    assert cli._strength("3e-2") == 0.03
    assert cli._strength('{"conv0": 3e-2, "dense0": 1}') == {"conv0": 0.03, "dense0": 1}
    for text in ("[1]", '{"conv0": "a"}', "{}", '{"conv0": -1}', "0", "abc"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["regularize", "x", "--strength", text])
        assert exit_info.value.code == 2 and "--strength" in capsys.readouterr().err


def test_per_layer_penalty_gradient_is_each_layers_strength_times_its_gradient():
    from hoyertrim import penalties
    from hoyertrim.pipeline.training import penalty_gradient
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {name: {"kernel": jax.random.normal(key, (4, 3)), "bias": jnp.ones(3)}
              for name, key in zip(("conv0", "dense0", "dense1"), keys)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = penalty_gradient("group_hoyer_square", {"conv0": 0.3, "dense0": 0.05})
    updates, _ = tx.update(zeros, tx.init(params), params)
    for name, alpha in (("conv0", 0.3), ("dense0", 0.05), ("dense1", 0.0)):
        expected = alpha * jax.grad(penalties.group_hoyer_square)(params[name]["kernel"])
        np.testing.assert_allclose(updates[name]["kernel"], expected, rtol=1e-6, atol=1e-7)
        assert not np.any(updates[name]["bias"])
    # One number: every kernel at that strength, as before.
    tx = penalty_gradient("group_hoyer_square", 0.3)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["dense1"]["kernel"], 0.3 * jax.grad(
        penalties.group_hoyer_square)(params["dense1"]["kernel"]), rtol=1e-6, atol=1e-7)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["nettrim", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 0.1)", "(default: cascade)", "(default: 5000)", "(default: 300)"):
        assert default in text


def test_regularize_prune_finetune_keeps_pruned_weights_zero(chain, capsys, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    assert cli.main(["regularize", str(chain / "dense"), "--penalty", "hoyer_square",
                     "--strength", "1e-3", "--epochs", "1", "--out", str(chain / "hs"),
                     *data]) == 0
    assert cli.main(["prune", str(chain / "hs"), "--rule", "magnitude", "--value", "0.8",
                     "--out", str(chain / "pruned"), *data]) == 0
    assert cli.main(["finetune", str(chain / "pruned"), "--epochs", "1", "--distill",
                     "--out", str(chain / "tuned"), *data]) == 0
    pruned, tuned = hoyertrim.load(chain / "pruned"), hoyertrim.load(chain / "tuned")
    for name in ("Conv_0", "Dense_0", "Dense_1"):
        p, t = np.asarray(pruned.params[name]["kernel"]), np.asarray(tuned.params[name]["kernel"])
        assert np.mean(p != 0) == pytest.approx(0.2, abs=0.01)
        assert np.all(t[p == 0] == 0) and np.any(t[p != 0] != p[p != 0])
    manifest = pipeline.read_manifest(chain / "tuned")
    assert manifest["config"]["teacher"] == str(chain / "dense")  # the chain's first stage
    capsys.readouterr()


def test_regularize_with_per_layer_strengths_through_the_command(chain, capsys, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    status, _, err = run(capsys, "regularize", str(chain / "dense"), "--strength",
                         '{"Conv_0": 1e-3, "conv9": 1e-3}', "--out", str(chain / "bad_hs"), *data)
    assert status == 1 and "No kernel named conv9" in err and "Conv_0, Dense_0" in err
    assert not (chain / "bad_hs").exists()
    assert cli.main(["regularize", str(chain / "dense"), "--penalty", "group_hoyer_square",
                     "--strength", '{"Dense_0": 1e-2, "Conv_0": 3e-2}', "--epochs", "1",
                     "--out", str(chain / "ghs_layers"), *data]) == 0
    manifest = pipeline.read_manifest(chain / "ghs_layers")
    assert manifest["config"]["strength"] == {"Conv_0": 3e-2, "Dense_0": 1e-2}
    assert report.stage_label(manifest) == "Group-HS α=Conv_0 0.03, Dense_0 0.01"
    capsys.readouterr()


def test_report_writes_figures_and_refuses_to_shrink(chain, capsys):
    stages = [str(chain / name) for name in ("dense", "trimmed", "small")]
    out = chain / "report"
    status, printed, _ = run(capsys, "report", *stages, "--out", str(out))
    assert status == 0 and str(out / "report.md") in printed
    text = (out / "report.md").read_text()
    for figure in ("kept_per_layer", "accuracy_vs_kept", "nettrim_certificates", "lambda_path"):
        assert f"({figure}.png)" in text and (out / f"{figure}.png").stat().st_size > 1000
    assert "Net-Trim cascade ε=0.1" in text and "`trimmed`" in text
    status, _, err = run(capsys, "report", stages[0], "--out", str(out))
    assert status == 1 and "--force" in err and (out / "report.md").read_text() == text
    # The same stages again: the folder is replaced as a whole (a figure an earlier report
    # wrote and this one does not is gone).
    record = json.loads((out / ".hoyertrim-report.json").read_text())
    (out / "old_figure.png").write_bytes(b"stale")
    record["files"].append("old_figure.png")
    (out / ".hoyertrim-report.json").write_text(json.dumps(record))
    status, _, _ = run(capsys, "report", *stages, "--out", str(out))
    assert status == 0 and not (out / "old_figure.png").exists()
    assert (out / "lambda_path.png").stat().st_size > 1000
    # A file the user put there: refused, even with --force, and nothing touched.
    (out / "notes.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in ([], ["--force"]):
        status, _, err = run(capsys, "report", stages[0], "--out", str(out), *extra)
        assert status == 1 and "did not write there (notes.md)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    foreign = chain / "someone_elses"
    foreign.mkdir()
    (foreign / "report.md").write_text("a user's own report")
    status, _, err = run(capsys, "report", *stages, "--out", str(foreign), "--force")
    assert status == 1 and (foreign / "report.md").read_text() == "a user's own report"
    assert not any(p.name.startswith(".") for p in chain.iterdir())  # no staging folder left


def test_report_shows_every_stage_and_leaves_matplotlib_alone(chain, capsys, tmp_path):
    import struct

    import matplotlib
    copies = []
    for k in range(7):  # beside the original, so their parent links hold
        copies.append(_copy_stage(chain / "trimmed", chain / f"trimmed-copy{k}"))
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's own choice, which a report must not switch
    try:
        status, _, err = run(capsys, "report", str(chain / "dense"), *map(str, copies),
                             "--out", str(tmp_path / "report"))
        assert status == 0, err
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
        for copy in copies:
            shutil.rmtree(copy)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "(The first 6 of 8 stages; `trimmed-copy5`, `trimmed-copy6` are in the table" in text
    assert all(f"`{copy.name}`" in text for copy in copies)
    # Seven Net-Trim stages: three rows of three panels.
    png = (tmp_path / "report" / "nettrim_certificates.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1260, 1020)
    # Accuracies drawn together share one split: test only where every stage has it.
    stages = [_copy_stage(chain / name, tmp_path / "split" / name) for name in ("dense", "trimmed")]
    for stage in stages:
        (stage / "evaluation-test.json").unlink(missing_ok=True)
    (stages[1] / "evaluation-test.json").write_text('{"accuracy": 0.5}')
    assert report._common_split(stages) == "validation"
    (stages[0] / "evaluation-test.json").write_text('{"accuracy": 0.5}')
    assert report._common_split(stages) == "test"


def test_load_of_a_training_stage_predicts_like_the_model(chain, tiny_data_root):
    loaded = hoyertrim.load(chain / "dense")
    test = load_dataset("mnist", tiny_data_root).test
    logits = loaded.model.apply({"params": loaded.params}, test.images[:50])
    np.testing.assert_allclose(loaded.predict(test.images[:50]), logits, rtol=1e-5, atol=1e-5)


def test_resolve_model_import_path(tmp_path, monkeypatch):
    package = tmp_path / "user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    model = pipeline.resolve_model("user_pkg.nets:TinyCNN", {"width": 3})
    assert type(model).__name__ == "TinyCNN" and model.width == 3
    assert sys.path == before  # widened for the import only
    assert pipeline.model_spec("user_pkg.nets:TinyCNN")["search_path"] == str(tmp_path)


@pytest.mark.parametrize("form", [pytest.param("orbax", marks=pytest.mark.slow),
                                  pytest.param("msgpack", marks=pytest.mark.slow),
                                  pytest.param("npz", marks=pytest.mark.slow)])
def test_import_weights_trained_elsewhere(tmp_path, capsys, tiny_data_root, form):
    import flax
    import jax
    import orbax.checkpoint as ocp
    (tmp_path / "my_models.py").write_text(USER_MODEL)
    model = pipeline.resolve_model(f"{tmp_path / 'my_models.py'}:TinyCNN")
    variables = model.init(jax.random.PRNGKey(3), np.zeros((1, 28, 28, 1), np.float32))
    if form == "orbax":
        weights = tmp_path / "ckpt"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(weights, {"params": variables["params"], "step": 7})
    elif form == "msgpack":
        weights = tmp_path / "weights.msgpack"
        weights.write_bytes(flax.serialization.to_bytes(variables))
    else:
        weights = tmp_path / "weights.npz"
        np.savez(weights, **{"/".join(k.key for k in path): np.asarray(leaf) for path, leaf
                             in jax.tree_util.tree_flatten_with_path(variables["params"])[0]})
    data = ["--data-dir", str(tiny_data_root)]
    status, out, err = run(capsys, "import", str(weights), "--model",
                           f"{tmp_path / 'my_models.py'}:TinyCNN", "--out",
                           str(tmp_path / "stage"), *data)
    assert status == 0, err
    loaded = hoyertrim.load(tmp_path / "stage")
    jax.tree.map(np.testing.assert_array_equal, loaded.params,
                 jax.tree.map(np.asarray, flax.core.unfreeze(variables["params"])))
    # The same weights do not fit another width: the mismatching leaves are named.
    status, _, err = run(capsys, "import", str(weights), "--model",
                         f"{tmp_path / 'my_models.py'}:TinyCNN", "--model-kwargs",
                         '{"width": 5}', "--out", str(tmp_path / "wrong"), *data)
    assert status == 1 and "do not fit" in err and "Conv_0/kernel" in err
    assert not (tmp_path / "wrong").exists()


def test_oneshot_peers_and_nm_through_the_command(chain, capsys, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress", "--samples", "600",
            "--heldout", "100"]
    assert cli.main(["oneshot", str(chain / "dense"), "--method", "sparsegpt", "--nm", "2:4",
                     "--out", str(chain / "sparsegpt24"), *data]) == 0
    manifest = pipeline.read_manifest(chain / "sparsegpt24")
    assert manifest["stage"] == "oneshot" and manifest["config"]["nm"] == [2, 4]
    params = hoyertrim.load(chain / "sparsegpt24").params
    # Conv_0's 3·3·1 = 9 inputs are no multiple of 4: left dense, the others 2:4.
    assert set(manifest["results"]["layers"]) == {"Dense_0", "Dense_1"}
    assert np.all(np.asarray(params["Conv_0"]["kernel"]) != 0)
    dense0 = np.asarray(params["Dense_0"]["kernel"])
    assert np.all((dense0 != 0).reshape(-1, 4, dense0.shape[1]).sum(axis=1) <= 2)
    assert cli.main(["oneshot", str(chain / "dense"), "--method", "wanda", "--kept-fraction",
                     "0.3", "--out", str(chain / "wanda30"), *data]) == 0
    for layer in pipeline.read_manifest(chain / "wanda30")["results"]["layers"].values():
        # Wanda keeps round(0.3·inputs) per output unit: Conv_0 has 9 inputs, so 3.
        assert layer["kept_fraction"] == pytest.approx(0.3, abs=0.04)
        assert layer["measured"] <= layer["epsilon_certified"] * (1 + 1e-4) + 1e-6
    with pytest.raises(SystemExit) as exit_info:  # a peer needs a kept fraction or N:M
        cli.main(["oneshot", str(chain / "dense"), "--method", "wanda", "--out",
                  str(chain / "none"), *data])
    assert exit_info.value.code == 2 and "one of the arguments" in capsys.readouterr().err
    assert not (chain / "none").exists()


def test_polish_through_the_command_keeps_fewer_weights(chain, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress", "--samples", "600",
            "--heldout", "200"]
    assert cli.main(["nettrim", str(chain / "dense"), "--epsilon", "0.1", "--polish", "1",
                     "--out", str(chain / "polished"), *data]) == 0
    manifest = pipeline.read_manifest(chain / "polished")
    plain = pipeline.read_manifest(chain / "trimmed")  # the chain's ε = 0.1 without polish
    assert manifest["config"]["polish"] == 1
    layers = manifest["results"]["layers"]
    for layer in layers.values():
        assert layer["measured"] <= layer["epsilon_certified"] * (1 + 1e-4)
    polished = [name for name, layer in layers.items() if layer.get("polish")]
    assert polished  # at least one layer went through a polish round, and it removed weights
    assert sum(sum(layers[n]["polish"]["removed"]) for n in polished) > 0
    kept = hoyertrim.load(chain / "polished").params
    before = hoyertrim.load(chain / "trimmed").params
    assert sum(int(np.count_nonzero(kept[n]["kernel"])) for n in kept) < \
        sum(int(np.count_nonzero(before[n]["kernel"])) for n in before)
    assert plain["config"].get("polish") is None


def test_layerwise_methods_keep_the_counts_of_another_stage(chain, capsys, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress", "--samples", "600",
            "--heldout", "100"]
    assert cli.main(["prune", str(chain / "dense"), "--rule", "std", "--value", "0.8",
                     "--out", str(chain / "std_like"), *data[:3]]) == 0
    like = hoyertrim.load(chain / "std_like").params
    for out, argv in (("sparsegpt_like", ["oneshot", "--method", "sparsegpt"]),
                      ("magnitude_like", ["oneshot", "--method", "magnitude"]),
                      ("nettrim_like", ["nettrim", "--polish", "1"])):
        assert cli.main([argv[0], str(chain / "dense"), *argv[1:], "--like",
                         str(chain / "std_like"), "--out", str(chain / out), *data]) == 0
        manifest = pipeline.read_manifest(chain / out)
        assert manifest["config"]["like"] == str(chain / "std_like")
        pruned = hoyertrim.load(chain / out).params
        for name in ("Conv_0", "Dense_0", "Dense_1"):
            target = np.asarray(like[name]["kernel"])
            assert np.count_nonzero(pruned[name]["kernel"]) == np.count_nonzero(target), out
            layer = manifest["results"]["layers"][name]
            assert layer["measured"] <= layer["epsilon_certified"] * (1 + 1e-4) + 1e-6
    # Net-Trim re-fits what it keeps: not the dense values on that support.
    dense = np.asarray(hoyertrim.load(chain / "dense").params["Dense_0"]["kernel"])
    refit = np.asarray(hoyertrim.load(chain / "nettrim_like").params["Dense_0"]["kernel"])
    assert not np.allclose(refit[refit != 0], dense[refit != 0])
    capsys.readouterr()


def test_like_refuses_another_network_and_leaves_nothing(chain, capsys, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    assert cli.main(["train", "--model", f"{chain / 'my_models.py'}:TinyCNN", "--model-kwargs",
                     '{"width": 5}', "--epochs", "1", "--out", str(chain / "width5"),
                     *data]) == 0
    for argv in (["oneshot", "--method", "magnitude"], ["nettrim"], ["gradual", "--epochs", "2"]):
        status, _, err = run(capsys, argv[0], str(chain / "dense"), *argv[1:], "--like",
                             str(chain / "width5"), "--out", str(chain / "bad_like"), *data)
        assert status == 1 and "is not the parent's network" in err and "Conv_0" in err
        assert not (chain / "bad_like").exists()
    with pytest.raises(pipeline.StageError, match="exactly one of"):
        pipeline.nettrim(chain / "dense", chain / "bad_like", kept_fraction=0.5,
                         like=chain / "width5", data_dir=tiny_data_root)
    assert not (chain / "bad_like").exists()


def test_gradual_reaches_the_counts_of_another_stage(chain, capsys, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    assert cli.main(["prune", str(chain / "dense"), "--rule", "std", "--value", "1.0",
                     "--out", str(chain / "std_pruned"), *data]) == 0
    assert cli.main(["gradual", str(chain / "dense"), "--like", str(chain / "std_pruned"),
                     "--epochs", "2", "--out", str(chain / "gradual"), *data]) == 0
    like, gradual = hoyertrim.load(chain / "std_pruned"), hoyertrim.load(chain / "gradual")
    dense = hoyertrim.load(chain / "dense")
    for name in ("Conv_0", "Dense_0", "Dense_1"):
        target = np.asarray(like.params[name]["kernel"])
        reached = np.asarray(gradual.params[name]["kernel"])
        assert np.count_nonzero(reached) == np.count_nonzero(target)  # the exact count
        assert np.all(np.asarray(gradual.masks[name]["kernel"]) == (reached != 0))
        # Trained while pruning: not the dense weights with the small ones cut.
        kept = reached != 0
        assert not np.allclose(reached[kept], np.asarray(dense.params[name]["kernel"])[kept])
    manifest = pipeline.read_manifest(chain / "gradual")
    assert manifest["config"]["like"] == str(chain / "std_pruned")
    assert report.stage_label(manifest) == "gradual magnitude (counts of std_pruned)"
    assert gradual.predict(load_dataset("mnist", tiny_data_root).validation.images[:10]).shape \
        == (10, 10)
    capsys.readouterr()


def test_gradual_refuses_a_bad_target_and_leaves_nothing(chain, capsys, tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    status, _, err = run(capsys, "gradual", str(chain / "dense"), "--like", str(chain),
                         "--out", str(chain / "bad_gradual"), *data)
    assert status == 1 and "is not a hoyertrim stage directory" in err
    assert not (chain / "bad_gradual").exists()
    with pytest.raises(pipeline.StageError, match="No kernel named nope"):
        pipeline.gradual(chain / "dense", chain / "bad_gradual", sparsity={"nope": 0.5},
                         data_dir=tiny_data_root)
    with pytest.raises(pipeline.StageError, match="one of sparsity="):
        pipeline.gradual(chain / "dense", chain / "bad_gradual", data_dir=tiny_data_root)
    assert not (chain / "bad_gradual").exists()
    with pytest.raises(SystemExit):
        cli.main(["gradual", str(chain / "dense"), "--sparsity", "1.5"])
    assert "must be in (0, 1)" in capsys.readouterr().err


def test_gradual_with_the_window_to_the_end_still_reaches_its_sparsity(chain, tiny_data_root):
    # end_fraction=1 ends the window on a step the run reaches, not one past its last step.
    result = pipeline.gradual(chain / "dense", chain / "gradual_half", sparsity=0.5,
                              training=pipeline.Training(epochs=2), end_fraction=1.0, updates_per_epoch=1, data_dir=tiny_data_root,
                              progress=False)
    tuned = hoyertrim.load(result.directory)
    for name in ("Conv_0", "Dense_0", "Dense_1"):
        kernel = np.asarray(tuned.params[name]["kernel"])
        assert np.count_nonzero(kernel) == kernel.size - kernel.size // 2
    with pytest.raises(pipeline.StageError, match="no mask update"):
        pipeline.gradual(chain / "dense", chain / "gradual_short", sparsity=0.5,
                         training=pipeline.Training(epochs=1), updates_per_epoch=1, data_dir=tiny_data_root)
    assert not (chain / "gradual_short").exists()


NNX_MODEL = textwrap.dedent("""
    from flax import nnx

    class NnxCNN(nnx.Module):  # Flax's NNX MNIST style: BatchNorm and Dropout, rngs
        def __init__(self, width: int = 4, *, rngs: nnx.Rngs):
            self.conv = nnx.Conv(1, width, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(width, rngs=rngs)
            self.hidden = nnx.Linear(width * 14 * 14, 32, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)
            self.out = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
            x = self.dropout(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))
            return self.out(x)
    """)


@pytest.mark.slow
def test_nnx_model_from_the_users_file_through_the_whole_chain(tmp_path, capsys,
                                                               tiny_data_root):
    from flax import nnx
    (tmp_path / "nnx_models.py").write_text(NNX_MODEL)
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    spec = f"{tmp_path / 'nnx_models.py'}:NnxCNN"
    assert cli.main(["train", "--model", spec, "--model-kwargs", '{"width": 6}', "--epochs", "3",
                     "--learning-rate", "3e-3", "--out", str(tmp_path / "dense"), *data]) == 0
    assert cli.main(["nettrim", str(tmp_path / "dense"), "--epsilon", "0.1", "--samples", "600",
                     "--heldout", "200", "--out", str(tmp_path / "trimmed"), *data]) == 0
    assert cli.main(["compact", str(tmp_path / "trimmed"), "--out", str(tmp_path / "small"),
                     *data]) == 0
    status, out, _ = run(capsys, "evaluate", str(tmp_path / "small"), *data)
    assert status == 0 and "test accuracy" in out
    dense = pipeline.read_manifest(tmp_path / "dense")
    trimmed = pipeline.read_manifest(tmp_path / "trimmed")
    small = pipeline.read_manifest(tmp_path / "small")
    assert dense["results"]["val_accuracy"] > 0.9
    assert set(trimmed["results"]["layers"]) == {"conv", "hidden", "out"}
    for layer in trimmed["results"]["layers"].values():
        assert layer["measured"] <= layer["epsilon_certified"]
    assert trimmed["results"]["layers"]["conv"]["program"] == "relu"  # through BatchNorm
    assert small["results"]["max_logit_difference"] < 1e-4
    assert small["results"]["weights_stored"] < sum(
        l["weights"] for l in trimmed["results"]["sparsity"]["layers"])
    # The user gets their own NNX module back, in training mode, with the pruned weights.
    loaded = hoyertrim.load(tmp_path / "trimmed")
    module = loaded.nnx_module()
    assert type(module).__name__ == "NnxCNN" and not module.bn.use_running_average
    test = load_dataset("mnist", tiny_data_root).test
    eval_module = nnx.view(module, use_running_average=True, deterministic=True)
    np.testing.assert_allclose(eval_module(test.images[:64]), loaded.predict(test.images[:64]),
                               rtol=1e-5, atol=1e-5)
    kept = np.count_nonzero(module.hidden.kernel[...])
    assert kept == trimmed["results"]["layers"]["hidden"]["kept_weights"]
    small_loaded = hoyertrim.load(tmp_path / "small")
    np.testing.assert_allclose(small_loaded.predict(test.images[:64]),
                               loaded.predict(test.images[:64]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_nnx_state_saved_with_orbax_is_imported(tmp_path, tiny_data_root):
    import orbax.checkpoint as ocp
    from flax import nnx
    (tmp_path / "nnx_models.py").write_text(NNX_MODEL)
    spec = f"{tmp_path / 'nnx_models.py'}:NnxCNN"
    model = pipeline.resolve_model(spec, {"width": 5}).build(nnx.Rngs(3))
    model.bn.mean[...] = 0.25  # statistics must land in batch_stats, not params
    with ocp.StandardCheckpointer() as saver:
        saver.save(tmp_path / "state", nnx.state(model))
    assert cli.main(["import", str(tmp_path / "state"), "--model", spec, "--model-kwargs",
                     '{"width": 5}', "--out", str(tmp_path / "imported"), "--data-dir",
                     str(tiny_data_root), "--no-progress"]) == 0
    loaded = hoyertrim.load(tmp_path / "imported")
    assert float(loaded.model_state["batch_stats"]["bn"]["mean"][0]) == 0.25
    images = load_dataset("mnist", tiny_data_root).test.images[:16]
    expected = nnx.view(model, use_running_average=True, deterministic=True)(images)
    np.testing.assert_allclose(loaded.predict(images), expected, rtol=1e-5, atol=1e-5)


PLAIN_MODEL = textwrap.dedent("""
    import flax.linen as nn
    import jax

    class PlainMLP(nn.Module):  # weights not named 'kernel': found as the maps they are
        @nn.compact
        def __call__(self, x):
            w1 = self.param("w1", nn.initializers.lecun_normal(), (784, 16))
            w2 = self.param("w2", nn.initializers.lecun_normal(), (16, 10))
            return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2
    """)


@pytest.mark.slow  # seconds: keeps the quick tier under 90 s
def test_weights_not_named_kernel_are_trained_reported_and_pruned(tmp_path, tiny_data_root):
    (tmp_path / "plain.py").write_text(PLAIN_MODEL)
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    assert cli.main(["train", "--model", f"{tmp_path / 'plain.py'}:PlainMLP", "--epochs", "1",
                     "--out", str(tmp_path / "dense"), *data]) == 0
    dense = pipeline.read_manifest(tmp_path / "dense")["results"]
    assert [layer["name"] for layer in dense["sparsity"]["layers"]] == ["w1", "w2"]
    assert cli.main(["nettrim", str(tmp_path / "dense"), "--epsilon", "0.2", "--samples", "300",
                     "--heldout", "50", "--out", str(tmp_path / "trim"), *data]) == 0
    trimmed = pipeline.read_manifest(tmp_path / "trim")["results"]
    assert set(trimmed["layers"]) == {"w1", "w2"} and trimmed["kept_fraction"] < 1
    evaluated = pipeline.evaluate(tmp_path / "trim", data_dir=tiny_data_root)
    assert [layer["name"] for layer in evaluated["sparsity"]["layers"]] == ["w1", "w2"]


def test_a_model_without_linear_maps_trains_and_says_what_it_cannot_prune(tmp_path, capsys,
                                                                          tiny_data_root):
    (tmp_path / "odd.py").write_text(textwrap.dedent("""
        import flax.linen as nn

        class Scaled(nn.Module):  # a weight matrix used elementwise: no contraction
            @nn.compact
            def __call__(self, x):
                table = self.param("table", nn.initializers.normal(), (784, 10))
                return x.reshape(x.shape[0], -1)[:, :10] * table[0]
        """))
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    assert cli.main(["train", "--model", f"{tmp_path / 'odd.py'}:Scaled", "--epochs", "1",
                     "--out", str(tmp_path / "dense"), *data]) == 0
    capsys.readouterr()
    status, _, err = run(capsys, "nettrim", str(tmp_path / "dense"), "--epsilon", "0.1",
                         "--samples", "100", "--heldout", "10", "--out", str(tmp_path / "trim"),
                         *data)
    assert status == 1 and "no linear map to prune" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "trim").exists()


def _copy_stage(source, destination):
    shutil.copytree(source, destination)
    return destination


@pytest.mark.parametrize("stage, folder", [("trimmed", "network"), ("trimmed", "network/masks"),
                                           ("small", "compact")])
def test_a_flipped_bit_in_a_stage_file_is_refused_by_every_reader(chain, capsys, tmp_path,
                                                                  tiny_data_root, stage,
                                                                  folder):
    copy = _copy_stage(chain / stage, tmp_path / stage)
    manifest = pipeline.read_manifest(copy)
    top = folder.split("/")[0]
    assert manifest["files"] and all(name.startswith(f"{top}/") for name in manifest["files"])
    assert pipeline.verify(copy) == len(manifest["files"])
    # One bit of the folder's largest file: the weights (or the masks) themselves.
    target = max((copy / name for name in manifest["files"] if name.startswith(f"{folder}/")),
                 key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    before = sorted(p.name for p in copy.iterdir())
    data = ["--data-dir", str(tiny_data_root)]
    commands = [["evaluate", str(copy), *data], ["verify", str(copy)]]
    if stage == "trimmed":
        commands += [["compact", str(copy), "--out", str(tmp_path / "out"), *data],
                     ["finetune", str(copy), "--epochs", "1", "--out", str(tmp_path / "out"),
                      "--no-progress", *data]]
    for argv in commands:
        status, _, err = run(capsys, *argv)
        assert status == 1 and len(err.strip().splitlines()) == 1, (argv, err)
        assert str(target) in err and "has changed since the" in err
    assert sorted(p.name for p in copy.iterdir()) == before and not (tmp_path / "out").exists()


def test_verify_checks_the_whole_chain(chain, capsys):
    status, out, _ = run(capsys, "verify", str(chain / "small"))
    lines = out.strip().splitlines()
    assert status == 0 and [line.split(":")[0] for line in lines] == [
        str(chain / "small"), str(chain / "trimmed"), str(chain / "dense")]
    assert all("files unchanged" in line for line in lines)


def test_a_manifest_naming_a_function_is_refused_without_calling_it(chain, capsys, tmp_path,
                                                                     tiny_data_root):
    copy = _copy_stage(chain / "trimmed", tmp_path / "trimmed")
    marker = tmp_path / "pwned"
    manifest = json.loads((copy / "hoyertrim.json").read_text())
    for spec, kwargs in (("os:system", {"command": f"touch {marker}"}),
                         ("subprocess:run", {"args": ["touch", str(marker)]}),
                         ("builtins:eval", {})):
        manifest["model"] = {"spec": spec, "kwargs": kwargs}
        (copy / "hoyertrim.json").write_text(json.dumps(manifest))
        status, _, err = run(capsys, "evaluate", str(copy), "--data-dir", str(tiny_data_root))
        assert status == 1 and "not a Flax Module class" in err and spec in err
        assert len(err.strip().splitlines()) == 1 and not marker.exists()


def test_structured_nettrim_then_compact_gives_a_smaller_dense_model(chain, capsys, tmp_path,
                                                                     tiny_data_root):
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    assert cli.main(["nettrim", str(chain / "dense"), "--units", "--kept-fraction", "0.5",
                     "--samples", "300", "--heldout", "100", "--out", str(tmp_path / "units"),
                     *data]) == 0
    trimmed = pipeline.read_manifest(tmp_path / "units")
    assert trimmed["config"]["units"] is True
    for layer in trimmed["results"]["layers"].values():
        assert layer["measured"] <= layer["epsilon_certified"]
    kernel = np.asarray(hoyertrim.load(tmp_path / "units").params["Dense_1"]["kernel"])
    assert np.any(kernel != 0, axis=1).sum() == 16  # half of Dense_0's 32 units are read
    assert cli.main(["compact", str(tmp_path / "units"), "--out", str(tmp_path / "small"),
                     *data[:2]]) == 0
    small = hoyertrim.load(tmp_path / "small").compact
    assert small.layers["Dense_0"].kernel.shape[-1] == 16
    status, _, err = run(capsys, "nettrim", str(chain / "dense"), "--units", "--nm", "2:4",
                         "--out", str(tmp_path / "no"), *data)
    assert status == 1 and "--units is Net-Trim's" in err and not (tmp_path / "no").exists()


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "a JSON list, not the manifest's object"),
    ('{"format": 1}', "is damaged (no stage, model, dataset, config, status)"),
    ("{not json", "is damaged"),
    (b"\xff\xfe\x00", "is damaged"),
])
def test_a_damaged_manifest_is_one_line(chain, capsys, tmp_path, tiny_data_root, content,
                                        message):
    copy = _copy_stage(chain / "trimmed", tmp_path / "trimmed")
    file = copy / "hoyertrim.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    for argv in (["evaluate", str(copy), "--data-dir", str(tiny_data_root)],
                 ["compact", str(copy), "--out", str(tmp_path / "out")], ["verify", str(copy)]):
        status, _, err = run(capsys, *argv)
        assert status == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_copied_chain_evaluates_against_its_copied_parent(chain, capsys, tmp_path,
                                                             tiny_data_root):
    copy = tmp_path / "copy"
    for name in ("dense", "trimmed"):
        shutil.copytree(chain / name, copy / name)
    status, out, err = run(capsys, "evaluate", str(copy / "trimmed"), "--data-dir",
                           str(tiny_data_root))
    assert status == 0, err
    result = json.loads((copy / "trimmed" / "evaluation-test.json").read_text())
    assert result["reference"] == str(copy / "dense")
    status, out, _ = run(capsys, "verify", str(copy / "trimmed"))
    assert status == 0 and str(copy / "dense") in out


def test_version(capsys):
    from importlib import metadata
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hoyertrim {metadata.version('hoyertrim')}"


def test_a_second_writer_to_the_same_folder_is_refused(chain, capsys, tmp_path):
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / pipeline.LOCK, "w") as handle:  # another command holds the stage
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, _, err = run(capsys, "prune", str(chain / "dense"), "--out", str(out))
        assert status == 1 and len(err.strip().splitlines()) == 1
        assert "is being written by another hoyertrim command" in err
        assert [p.name for p in out.iterdir()] == [pipeline.LOCK]
    # Once it is done (the lock released, even if its file stayed), the folder is usable.
    status, _, err = run(capsys, "prune", str(chain / "dense"), "--out", str(out))
    assert status == 0, err
    assert not (out / pipeline.LOCK).exists()


def test_an_interrupted_nettrim_resumes_from_its_solved_layers(chain, tmp_path, monkeypatch,
                                                               tiny_data_root):
    import hoyertrim.nettrim
    from hoyertrim.pipeline import pruning
    out = tmp_path / "trimmed"
    arguments = dict(epsilon=0.1, samples=600, heldout=200, data_dir=tiny_data_root,
                     progress=False)
    save = pruning._save_layer
    calls = []

    def save_then_interrupt(*args):
        save(*args)
        calls.append(args[1])
        raise KeyboardInterrupt  # Ctrl-C right after the first layer was kept

    monkeypatch.setattr(pruning, "_save_layer", save_then_interrupt)
    with pytest.raises(pipeline.StageInterrupted) as interrupted:
        pipeline.nettrim(chain / "dense", out, **arguments)
    assert interrupted.value.resumable and interrupted.value.directory == out
    assert pipeline.read_manifest(out)["status"] == "interrupted"
    assert len(list((out / "layers").glob("*.npz"))) == 1
    monkeypatch.setattr(pruning, "_save_layer", save)
    prune_network = hoyertrim.nettrim.prune_network
    given = []

    def spy(*args, solved=None, **kwargs):
        given.append(sorted(solved))
        return prune_network(*args, solved=solved, **kwargs)

    monkeypatch.setattr(hoyertrim.nettrim, "prune_network", spy)
    result = pipeline.nettrim(chain / "dense", out, **arguments)
    assert given == [calls] and not (out / "layers").exists()
    assert result.results["resumed_layers"] == calls
    # The resumed stage equals the uninterrupted one made with the same settings.
    ours, theirs = hoyertrim.load(out), hoyertrim.load(chain / "trimmed")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours.params),
                                                     jax.tree.leaves(theirs.params)))
    assert result.results["layers"].keys() == \
        pipeline.read_manifest(chain / "trimmed")["results"]["layers"].keys()


def test_import_of_a_stage_takes_its_selected_epoch(chain, capsys, tmp_path, tiny_data_root):
    copy = _copy_stage(chain / "dense", tmp_path / "dense")
    selected = pipeline.read_manifest(copy)["results"]["epoch"]
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    other = next(step for step in steps if step != selected)
    # Make the newest checkpoint hold another epoch: reading "the newest step" would take it.
    (copy / "checkpoints" / str(other)).rename(copy / "checkpoints" / "999")
    status, _, err = run(capsys, "import", str(copy), "--model", f"{chain / 'my_models.py'}:TinyCNN",
                         "--model-kwargs", '{"width": 6}', "--out", str(tmp_path / "imported"),
                         "--data-dir", str(tiny_data_root))
    assert status == 0, err
    imported, original = hoyertrim.load(tmp_path / "imported"), hoyertrim.load(chain / "dense")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(imported.params),
                                                     jax.tree.leaves(original.params)))


def test_evaluate_keeps_results_of_other_references_and_survives_a_read_only_stage(
        chain, capsys, tmp_path, tiny_data_root, monkeypatch):
    copy = tmp_path / "copy"
    for name in ("dense", "trimmed"):
        _copy_stage(chain / name, copy / name)
    data = ["--data-dir", str(tiny_data_root)]
    assert run(capsys, "evaluate", str(copy / "trimmed"), *data)[0] == 0
    default = (copy / "trimmed" / "evaluation-test.json").read_text()
    status, out, _ = run(capsys, "evaluate", str(copy / "trimmed"), "--reference",
                         str(copy / "trimmed"), *data)
    assert status == 0
    other = list((copy / "trimmed").glob("evaluation-test-vs-*.json"))
    assert len(other) == 1 and str(other[0]) in out
    assert json.loads(other[0].read_text())["top1_agreement"] == 1.0
    assert (copy / "trimmed" / "evaluation-test.json").read_text() == default
    # A stage that cannot be written to: the result is printed, and said not to be saved.
    write_text = type(copy).write_text

    def read_only(path, *args, **kwargs):
        if path.parent == copy / "trimmed":
            raise PermissionError(13, "Read-only file system")
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(type(copy), "write_text", read_only)
    status, out, err = run(capsys, "evaluate", str(copy / "trimmed"), "--split", "validation",
                           *data)
    assert status == 0, err
    assert "accuracy" in out and "not saved (cannot write to" in out
    assert not list((copy / "trimmed").glob("*evaluation-validation*"))


def test_a_chain_mixed_with_another_run_is_found_out(chain, capsys, tmp_path, tiny_data_root):
    copy = tmp_path / "copy"
    _copy_stage(chain / "trimmed", copy / "trimmed")
    _copy_stage(chain / "small", copy / "small")
    # In the place of the parent stands another stage (here: the pruned one).
    _copy_stage(chain / "trimmed", copy / "dense")
    for argv in (["verify", str(copy / "small")],
                 ["evaluate", str(copy / "trimmed"), "--data-dir", str(tiny_data_root)]):
        status, _, err = run(capsys, *argv)
        assert status == 1 and len(err.strip().splitlines()) == 1, err
        assert "is not the stage" in err and "mixed with another run" in err
    # Reusing a stage made from a parent that has since been replaced is refused too.
    other = tmp_path / "other"
    _copy_stage(chain / "small", other / "small")
    _copy_stage(chain / "dense", other / "trimmed")  # same path, another stage
    status, _, err = run(capsys, "compact", str(other / "trimmed"), "--out", str(other / "small"))
    assert status == 1 and "holds another run (parent_digest" in err


def test_debug_shows_the_traceback_and_warnings_are_hidden(capsys, tmp_path):
    with pytest.raises(pipeline.StageError):
        cli.main(["--debug", "evaluate", str(tmp_path / "missing")])
    status, _, err = run(capsys, "evaluate", str(tmp_path / "missing"))
    assert status == 1 and err.strip() == f"hoyertrim evaluate: error: {tmp_path / 'missing'} " \
                                          "does not exist."


def _two_processes(*arguments) -> list[str]:
    """Runs ``hoyertrim ARGUMENTS`` as two processes joined by a loopback coordinator (gloo CPU
    collectives), each checked to exit 0; their standard outputs."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, "-c", "import sys; from hoyertrim import cli, data; "
         "data._verify = lambda *a: None; sys.exit(cli.main())",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
         *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}) for i in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


@pytest.mark.slow
def test_two_processes_run_one_nettrim_stage_and_one_writes_it(chain, tmp_path, tiny_data_root):
    """`hoyertrim --coordinator … nettrim` as two processes on this machine (loopback, gloo):
    each runs the forward passes of half the calibration images, process 0 alone writes and
    prints; the stage equals the one-process stage with the same settings."""
    out = tmp_path / "two"
    outputs = _two_processes(
        "nettrim", str(chain / "dense"), "--epsilon", "0.1", "--samples", "600", "--heldout",
        "200", "--out", str(out), "--data-dir", str(tiny_data_root), "--no-progress")
    # (gloo's own C++ prints a line per process; hoyertrim's lines come from process 0 only)
    assert f"wrote {out}" in outputs[0] and "wrote" not in outputs[1]
    two, one = pipeline.read_manifest(out), pipeline.read_manifest(chain / "trimmed")
    assert pipeline.verify(out) == len(two["files"]) > 0
    for name, layer in one["results"]["layers"].items():
        assert two["results"]["layers"][name]["kept_weights"] == layer["kept_weights"]
        assert two["results"]["layers"][name]["measured"] == pytest.approx(layer["measured"],
                                                                           rel=2e-3)
    masks = [jax.tree.leaves(hoyertrim.load(d).masks) for d in (out, chain / "trimmed")]
    assert all(np.array_equal(a, b) for a, b in zip(*masks))


def test_a_refused_run_leaves_the_other_runs_folder_as_it_was(chain, capsys, tmp_path,
                                                              tiny_data_root):
    copy = _copy_stage(chain / "dense", tmp_path / "dense")  # with resumable checkpoints
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    status, _, err = run(capsys, "train", "--model", f"{chain / 'my_models.py'}:TinyCNN",
                         "--model-kwargs", '{"width": 6}', "--epochs", "5", "--out", str(copy),
                         "--data-dir", str(tiny_data_root))
    assert status == 1 and "holds another run (config.epochs: 4 there, 5 asked" in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_training_settings_are_declared_once_and_reach_every_training_command():
    """Each `pipeline.Training` field is a flag of every training command, defaulting to that
    stage's defaults; `training_kwargs` gathers the same fields out of a flat settings dict."""
    parser = cli.build_parser()
    for command, parent in (("train", []), ("regularize", ["p"]), ("gradual", ["p", "--sparsity",
                                                                            "0.5"]),
                            ("finetune", ["p"])):
        args = parser.parse_args([command, *parent])
        assert cli._training(args) == pipeline.TRAINING_DEFAULTS[command]
        args = parser.parse_args([command, *parent, "--epochs", "3", "--batch-size", "7",
                                  "--optimizer", "sgd", "--learning-rate", "0.5", "--schedule",
                                  "constant", "--weight-decay", "0.1", "--seed", "4",
                                  "--train-examples", "100"])
        assert cli._training(args) == pipeline.Training(3, 7, "sgd", 0.5, "constant", 0.1, 4, 100)
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "p", "--batch-size", "0"])
    kwargs = pipeline.training_kwargs("finetune", {"epochs": 3, "distill": True})
    assert kwargs == {"distill": True, "training": pipeline.Training(epochs=3,
                                                                     learning_rate=3e-4)}
    assert pipeline.training_kwargs("prune", {"rule": "std"}) == {"rule": "std"}


@pytest.mark.slow
def test_two_processes_fine_tune_like_one(chain, tmp_path, tiny_data_root):
    """`hoyertrim --coordinator … finetune` as two processes on this machine (loopback, gloo):
    each process takes half of every batch, the gradients are summed across them, process 0
    writes; the fine-tuned weights equal a one-process run's up to the reduction order and the
    masks (pruned weights exactly 0) are the same."""
    settings = ["finetune", str(chain / "trimmed"), "--epochs", "1", "--batch-size", "100",
                "--train-examples", "400", "--data-dir", str(tiny_data_root), "--no-progress"]
    out = tmp_path / "two"
    outputs = _two_processes(*settings, "--out", str(out))
    assert f"wrote {out}" in outputs[0] and "wrote" not in outputs[1]
    assert cli.main([*settings, "--out", str(tmp_path / "one")]) == 0
    two, one = (hoyertrim.load(d) for d in (out, tmp_path / "one"))
    assert pipeline.verify(out) == len(pipeline.read_manifest(out)["files"]) > 0
    for a, b in zip(jax.tree.leaves(two.masks), jax.tree.leaves(one.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_resume_an_interrupted_nettrim_from_its_solved_layers(
        chain, tmp_path, monkeypatch, tiny_data_root):
    """A nettrim stage interrupted after its first layer, resumed by `hoyertrim --coordinator …`
    as two processes: both keep the solved layer (the stage records it) and the stage equals the
    uninterrupted one."""
    from hoyertrim.pipeline import pruning
    out = tmp_path / "trimmed"
    save = pruning._save_layer

    def save_then_interrupt(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(pruning, "_save_layer", save_then_interrupt)
    with pytest.raises(pipeline.StageInterrupted):
        pipeline.nettrim(chain / "dense", out, epsilon=0.1, samples=600, heldout=200,
                         data_dir=tiny_data_root, progress=False)
    kept = [str(np.load(f)["name"]) for f in (out / "layers").glob("*.npz")]
    assert len(kept) == 1
    _two_processes("nettrim", str(chain / "dense"), "--epsilon", "0.1", "--samples", "600",
                   "--heldout", "200", "--out", str(out), "--data-dir", str(tiny_data_root),
                   "--no-progress")
    manifest = pipeline.read_manifest(out)
    assert manifest["status"] == "complete" and manifest["results"]["resumed_layers"] == kept
    assert not (out / "layers").exists()
    ours, theirs = hoyertrim.load(out), hoyertrim.load(chain / "trimmed")
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_group_hs_on_a_resnet_penalizes_and_prunes_its_stream_channels_as_groups(
        tmp_path, capsys, tiny_data_root):
    """ResNet-8 (one block per stage): regularize with Group-HS adds the coupled groups' term
    (the stream channels found from the computation) and `prune --rule group` removes the
    stream channels whose joint norm is below 0.9 of the largest from every conv that writes
    them, so `compact` drops them everywhere."""
    data = ["--data-dir", str(tiny_data_root), "--no-progress"]
    kwargs = json.dumps({"blocks_per_stage": 1, "input_shape": [28, 28, 1]})
    spec = "hoyertrim.models:CifarResNet"
    assert cli.main(["train", "--model", spec, "--model-kwargs", kwargs, "--epochs", "1",
                     "--out", str(tmp_path / "dense"), *data]) == 0
    assert cli.main(["regularize", str(tmp_path / "dense"), "--penalty", "group_hoyer_square",
                     "--strength", "1e-2", "--epochs", "1", "--out", str(tmp_path / "ghs"),
                     *data]) == 0
    assert cli.main(["prune", str(tmp_path / "ghs"), "--rule", "group", "--value", "0.9",
                     "--out", str(tmp_path / "pruned"), *data]) == 0
    pruned = hoyertrim.load(tmp_path / "pruned")
    from hoyertrim.inspection import inspect_model
    found = inspect_model(pruned.model, {"params": pruned.params, **pruned.model_state},
                          jnp.zeros((1, 28, 28, 1)))
    # The stage-3 stream's channels written by two or more convs (its 32 zero-padded channels
    # have one writer each, the stage's only block).
    assert len(found.coupled) == 32

    def kernel(layer):
        node = pruned.params
        for key in layer.split("/"):
            node = node[key]
        return np.asarray(node["kernel"])

    dead = [g for g in found.coupled
            if all(not kernel(layer)[..., unit].any() for layer, unit in g.members)]
    assert dead  # whole stream channels went, in every conv that writes them
    assert cli.main(["compact", str(tmp_path / "pruned"), "--out", str(tmp_path / "compact"),
                     *data]) == 0
    capsys.readouterr()
    stem_dead = sum(("Conv_0", u) in g.members for g in dead for u in range(16))
    compact_layers = json.loads((tmp_path / "compact" / "hoyertrim.json").read_text())[
        "results"]["layers"]
    assert compact_layers["Conv_0"]["outputs_kept"] <= 16 - stem_dead
