"""The registry of pruning methods and the `LayerPruner` interface every solver implements."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from hoyertrim import cli, nettrim, peers, pruners
from hoyertrim.nettrim import as_pruner
from hoyertrim.pipeline import ONESHOT_METHODS


def test_the_registry_holds_netrim_and_the_peers_with_what_each_takes():
    assert pruners.pruner_names(one_shot=True) == ("magnitude", "wanda", "sparsegpt")
    assert pruners.pruner_names(one_shot=False) == (
        "nettrim", "nettrim-units", "nettrim-nm", "nettrim-admm")
    nettrim_ = pruners.get_pruner("nettrim")
    assert nettrim_.solve is nettrim.solve_layer and nettrim_.options == {"shard", "progress"}
    assert nettrim_.takes_gram and not nettrim_.trained_weights and not nettrim_.structured
    assert pruners.get_pruner("nettrim-units").structured
    assert pruners.get_pruner("nettrim-nm").trained_weights
    admm = pruners.get_pruner("nettrim-admm")
    assert not admm.takes_gram and admm.options == frozenset()
    for name in ("magnitude", "wanda", "sparsegpt"):
        peer = pruners.get_pruner(name)
        assert peer is getattr(peers, f"{name}_layer")
        assert peer.one_shot and peer.trained_weights and peer.takes_gram and peer.description


def test_an_unknown_name_is_refused_with_the_names_to_choose_from():
    with pytest.raises(ValueError, match="choose one of nettrim, nettrim-units.*sparsegpt"):
        pruners.get_pruner("obs")


def test_the_pipeline_and_the_cli_choose_from_the_registry():
    assert ONESHOT_METHODS == pruners.pruner_names(one_shot=True)
    parser = cli.build_parser()
    args = parser.parse_args(["oneshot", "some/dir", "--method", "wanda", "--kept-fraction", "0.5"])
    assert args.method == "wanda"
    with pytest.raises(SystemExit):
        parser.parse_args(["oneshot", "some/dir", "--method", "obs", "--kept-fraction", "0.5"])


def test_a_plain_function_is_described_by_its_signature():
    def mine(x=None, y=None, *, trained_kernel=None, gram=None, shard=True, **options):
        raise AssertionError("not called")

    pruner = as_pruner(mine)
    assert (pruner.name, pruner.trained_weights, pruner.takes_gram, pruner.structured,
            pruner.options) == ("mine", True, True, False, {"shard"})
    assert as_pruner(pruner) is pruner
    with pytest.raises(TypeError, match="LayerPruner or a function"):
        as_pruner("sparsegpt")


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


def test_a_one_shot_pruner_asks_for_a_kept_fraction_not_an_epsilon():
    images = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    params = _MLP().init(jax.random.PRNGKey(0), images[:1])["params"]
    with pytest.raises(ValueError, match="sparsegpt fixes a sparsity.*give kept_fraction"):
        nettrim.prune_network(_MLP(), params, images, epsilon=0.1, solver=peers.sparsegpt_layer,
                              progress=False)


def test_a_pruned_layer_record_round_trips_and_refuses_a_foreign_one():
    record = nettrim.PrunedLayer(
        program="relu", reason="a ReLU follows", bounds="…", mode="epsilon",
        epsilon_requested=0.1, epsilon_certified=0.1, discrepancy=0.09, feasible=True,
        weights=12, kept_weights=3, kept_fraction=0.25, samples=40, measured=0.0899,
        lam_path=({"lam": 1.0, "discrepancy": 0.09, "kept_fraction": 0.25},))
    assert nettrim.PrunedLayer.from_dict(record.as_dict()) == record
    with pytest.raises(ValueError, match="unknown fields epsilon"):
        nettrim.PrunedLayer.from_dict({**record.as_dict(), "epsilon": 0.1})
