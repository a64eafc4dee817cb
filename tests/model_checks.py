"""Reference procedures the model-level tests share: a few optimizer steps on fixed tokens, and greedy decoding by
re-scoring the whole sequence at every step (no caches)."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx


def train_losses(model, tokens_BT, steps: int, lr: float = 3e-3) -> list[float]:
    """Losses of `steps` Adam steps of next-token cross-entropy + the mixers' aux loss on `tokens_BT` (in place)."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            out = model(tokens_BT[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits_BTV, tokens_BT[:, 1:]).mean()
            return ce + out.aux_loss

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def greedy_by_rescoring(model, prompt: list[int], n: int) -> list[int]:
    """The n greedy tokens after `prompt`, each from a full forward of everything so far (the padding after the
    sequence is invisible to a causal model)."""
    forward = nnx.jit(lambda model, tokens: model(tokens).logits_BTV)
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.zeros((1, len(prompt) + n), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
        seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
    return seq[len(prompt):]
