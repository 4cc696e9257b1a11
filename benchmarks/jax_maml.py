"""MAML in JAX on the benchmark's network and tasks: the whole meta-step under one ``jax.jit``, tasks
under ``jax.vmap``, inner gradients by ``jax.grad`` (second order: the outer ``jax.grad``
differentiates through them), Adam from optax (or the same update written out when optax is
missing). A comparison row of ``meta_iteration.py``, not part of the library.

The network is read off the PyTorch ``Conv4`` (max-pool or stride-2 downsampling) with its
parameters, so both start from the same θ: 3×3 convolutions with padding 1, transductive
BatchNorm (batch statistics, biased variance, ε = 1e-5), ReLU, 2×2 max-pooling or the mean over the
positions left, a linear classifier, cross-entropy.
"""

from __future__ import annotations

import os

# JAX takes 75% of a GPU's memory at start-up unless told otherwise; PyTorch shares the card here.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

#: ``--precision`` -> JAX's default precision for convolutions and matrix products
PRECISIONS = {"fp32": "float32", "tf32": "tensorfloat32", "bf16": "bfloat16"}
EPS = 1e-5


def parameters_of(model) -> tuple[dict, str]:
    """The torch Conv4's parameters as JAX arrays (same names), and its downsampling."""
    return {name: jnp.asarray(p.detach().cpu().numpy()) for name, p in model.named_parameters()}, model.downsample


def forward(params: dict, x, downsample: str, blocks: int = 4):
    for i in range(blocks):
        w, b = params[f"features.{i}.0.weight"], params[f"features.{i}.0.bias"]
        stride = 2 if downsample == "stride" else 1
        x = jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW")) + b.reshape(1, -1, 1, 1)
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        gamma, beta = params[f"features.{i}.1.weight"], params[f"features.{i}.1.bias"]
        x = (x - mean) / jnp.sqrt(var + EPS) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
        x = jax.nn.relu(x)
        if downsample == "max-pool":
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    x = x.mean(axis=(2, 3)) if downsample == "stride" else x.reshape(x.shape[0], -1)
    return x @ params["classifier.weight"].T + params["classifier.bias"]


def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()


def meta_loss_fn(downsample: str, inner_lr: float, steps: int):
    def task_loss(params, x, y):
        return cross_entropy(forward(params, x, downsample), y)

    def query_loss(theta, xs, ys, xq, yq):
        params = theta
        for _ in range(steps):
            grads = jax.grad(task_loss)(params, xs, ys)
            params = jax.tree_util.tree_map(lambda p, g: p - inner_lr * g, params, grads)
        return task_loss(params, xq, yq)

    def meta_loss(theta, xs, ys, xq, yq):
        return jax.vmap(query_loss, in_axes=(None, 0, 0, 0, 0))(theta, xs, ys, xq, yq).mean()

    return meta_loss


def adam(meta_lr: float):
    """optax's Adam, or the same update (PyTorch's Adam: bias-corrected, ε after the square root)."""
    try:
        import optax

        return optax.adam(meta_lr)
    except ImportError:
        pass

    class Adam:
        def init(self, params):
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            return (0, zeros, zeros)

        def update(self, grads, state, params=None):
            t, m, v = state
            t += 1
            m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
            v = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
            updates = jax.tree_util.tree_map(
                lambda m, v: -meta_lr * (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8), m, v)
            return updates, (t, m, v)

    return Adam()


def compiled_step(downsample: str, steps: int, inner_lr: float, meta_lr: float, precision: str):
    """``step(theta, state, xs, ys, xq, yq) -> (theta, state, loss)``: one outer Adam step, jitted."""
    meta_loss = meta_loss_fn(downsample, inner_lr, steps)
    optimizer = adam(meta_lr)

    def step(theta, state, xs, ys, xq, yq):
        with jax.default_matmul_precision(PRECISIONS[precision]):
            loss, grads = jax.value_and_grad(meta_loss)(theta, xs, ys, xq, yq)
        updates, state = optimizer.update(grads, state, theta)
        return jax.tree_util.tree_map(lambda p, u: p + u, theta, updates), state, loss

    donate = (0, 1) if jax.default_backend() != "cpu" else ()  # (the CPU backend cannot reuse donated buffers)
    return jax.jit(step, donate_argnums=donate), optimizer


def meta_gradient(model, tasks, steps: int, inner_lr: float, precision: str = "fp32") -> dict:
    """MAML's meta-gradient of the mean query loss at ``model``'s θ on ``tasks``, as NumPy arrays by
    parameter name (to check this implementation against the PyTorch ones)."""
    theta, downsample = parameters_of(model)
    xs, ys, xq, yq = (jnp.asarray(t.detach().cpu().numpy()) for t in tasks)
    with jax.default_matmul_precision(PRECISIONS[precision]):
        grads = jax.jit(jax.grad(meta_loss_fn(downsample, inner_lr, steps)))(theta, xs, ys, xq, yq)
    return {name: np.array(value) for name, value in grads.items()}


def meta_step(model, tasks, steps: int, inner_lr: float, meta_lr: float, precision: str = "fp32"):
    """A function performing one jitted JAX meta-iteration of MAML on ``tasks`` (torch tensors,
    copied to JAX's default device once), starting from ``model``'s θ. It blocks until the step is
    done, so that it can be timed like the PyTorch rows. ``.theta()`` returns the current θ."""
    theta, downsample = parameters_of(model)
    xs, ys, xq, yq = (jnp.asarray(t.detach().cpu().numpy()) for t in tasks)
    step, optimizer = compiled_step(downsample, steps, inner_lr, meta_lr, precision)
    state = {"theta": theta, "optimizer": optimizer.init(theta)}

    def run():
        state["theta"], state["optimizer"], loss = step(state["theta"], state["optimizer"], xs, ys, xq, yq)
        loss.block_until_ready()

    run.theta = lambda: {name: np.asarray(value) for name, value in state["theta"].items()}
    return run


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}: {getattr(device, 'device_kind', device)}"
