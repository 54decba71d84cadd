import jax
import optax
from flax import nnx

from hoyertrim import nettrim
from hoyertrim.data import load_dataset


class CNN(nnx.Module):  # any ordinary Flax model, NNX or linen
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(8 * 14 * 14, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv(x)), (2, 2), strides=(2, 2))
        return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


mnist = load_dataset("mnist")  # from $HOYERTRIM_DATA, the cache, or a download
model = CNN(rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


@nnx.jit
def step(model, optimizer, images, labels):
    def loss(model):
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    optimizer.update(model, nnx.grad(loss)(model))


for i in range(0, 20000, 100):  # a short training run standing in for yours
    step(model, optimizer, mnist.train.images[i:i + 100], mnist.train.labels[i:i + 100])

pruned = nettrim.prune_network(model, None, mnist.train.images[:1000], epsilon=0.1,
                               scheme="cascade", heldout=mnist.validation.images[:500])
for name, layer in pruned.layers.items():
    print(f"{name}: {layer.program} program, kept {layer.kept_fraction:.1%}, certified "
          f"ε {layer.epsilon_certified:.3f}, measured {layer.measured:.3f} — {layer.reason}")
print(pruned.heldout)  # logits' relative error and top-1 agreement on the held-out images
small_model = pruned.module  # the pruned NNX module (yours is unchanged); masks: pruned.masks
