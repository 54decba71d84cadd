import flax.linen as nn
import jax
import optax

from hoyertrim import nettrim
from hoyertrim.data import load_dataset


class CNN(nn.Module):  # any ordinary Flax model
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


mnist = load_dataset("mnist")  # from $HOYERTRIM_DATA, the cache, or a download
model, tx = CNN(), optax.adam(1e-3)
params = model.init(jax.random.PRNGKey(0), mnist.train.images[:1])["params"]
opt_state = tx.init(params)


@jax.jit
def step(params, opt_state, images, labels):
    def loss(p):
        logits = model.apply({"params": p}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state


for i in range(0, 20000, 100):  # a short training run standing in for yours
    params, opt_state = step(params, opt_state, mnist.train.images[i:i + 100],
                             mnist.train.labels[i:i + 100])

pruned = nettrim.prune_network(model, params, mnist.train.images[:1000], epsilon=0.1,
                               scheme="cascade", heldout=mnist.validation.images[:500])
for name, layer in pruned.layers.items():
    print(f"{name}: {layer['program']} program, kept {layer['kept_fraction']:.1%}, certified "
          f"ε {layer['epsilon']:.3f}, measured {layer['measured']:.3f} — {layer['reason']}")
print(pruned.heldout)  # logits' relative error and top-1 agreement on the held-out images
