"""One meta-iteration of MAML (and FOMAML, iMAML) implemented in several ways, on the same task tensors.

Each entry of :data:`IMPLEMENTATIONS` takes ``(model, tasks, inner_steps)`` and returns a function
performing one meta-iteration (an outer Adam step on ``model``'s parameters):

* ours: the library's engine, eager (per task, or vectorized with ``torch.func.vmap``) and, on CUDA,
  captured as a CUDA graph (``cuda graph`` rows); its conv blocks in the plain order with closed-form
  BatchNorm derivatives (:mod:`bilevel_maml.batch_norm`) by default, or as a row names: in the
  reordered block (``pool before norm``: :class:`bilevel_maml.models.ConvBlock`), with PyTorch's
  BatchNorm derivatives (``pytorch norm grads``), with channels-last weights, with the first
  convolution unfolded into a matrix product, or with the convolutions' derivatives as whole grouped
  convolutions (``grouped conv grads``: :mod:`bilevel_maml.grouped_conv`);
* learn2learn 0.2.0's ``l2l.algorithms.MAML`` clone/adapt loop, second and first order;
* a plain per-task loop as in the textbook pseudocode (``torch.autograd.grad(create_graph=True)``);
* research rows: other exact formulations of the same meta-gradient (forward-over-reverse
  Hessian-vector products, ``torch.compile`` — on a GPU also replayed as CUDA graphs —, BatchNorm
  from primitive ops) and the plain ``torch.func`` sketch, whose BatchNorm meta-gradient is wrong
  (see tests/test_benchmark_script.py);
  the rows that are not ours run the network in the plain block order with PyTorch's derivatives,
  as ``nn.Module`` layers do;
* JAX (``jax.jit`` of ``jax.vmap`` over tasks, the same network and step) when ``jax`` is
  importable: :mod:`jax_maml`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel_maml.data.device_sampler import DeviceTaskSource
from bilevel_maml.engine import MetaEngine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.execution import CapturedExecution, largest_cpu_chunk, precision_scope
from bilevel_maml.models import Conv2d, Conv4, use_closed_form_norm_grads, use_grouped_conv_grads
from bilevel_maml.problems import ALGORITHMS

INNER_LR, META_LR, LAM, CG_ITERATIONS = 0.4, 1e-3, 1.0, 5
#: the precision every row runs at (``--precision``); ours takes it as the engine's setting
PRECISION = {"value": "fp32"}


class FixedTasks(DeviceTaskSource):
    """The benchmark's meta-batch as a device-resident task source: every draw of the whole
    meta-batch returns it, smaller draws cycle through its tasks. (Device-resident, so that our
    meta-iteration can be captured; the tensors are the ones every implementation gets.)"""

    def __init__(self, tasks):
        self.xs, self.ys, self.xq, self.yq = tasks
        self.ways = int(self.ys[0].max()) + 1
        self.shots = self.xs.shape[1] // self.ways
        self.query_shots = self.xq.shape[1] // self.ways
        self.next = 0

    @property
    def device(self):
        return self.xs.device

    def to(self, device):
        return self

    def sample(self, count, generator, dtype=None):
        if count == len(self.xs):
            return (self.xs, self.ys), (self.xq, self.yq)
        picked = [(self.next + i) % len(self.xs) for i in range(count)]
        self.next += count
        return (self.xs[picked], self.ys[picked]), (self.xq[picked], self.yq[picked])


def ours(algorithm, vectorize, model, tasks, steps, chunk=None, cuda_graph=False):
    xs, ys, xq, yq = tasks
    upper_cls, lower_cls = ALGORITHMS[algorithm]
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    upper_kwargs = {"cg_iterations": CG_ITERATIONS} if algorithm == "imaml" else {}
    lower_kwargs = {"lam": LAM} if algorithm == "imaml" else {}

    def engine(tasks_per_call):
        sampler = FixedTasks(tasks)
        env = EpisodicEnv(sampler, ways=sampler.ways, shots=sampler.shots, query_shots=sampler.query_shots,
                          device=xs.device)
        upper = upper_cls(model, optimizer, meta_batch_size=len(xs), **upper_kwargs)
        lower = lower_cls(model, inner_lr=INNER_LR, inner_steps=steps, **lower_kwargs)
        return MetaEngine(upper, lower, env, meta_iterations=10**9, vectorize=tasks_per_call, cuda_graph=cuda_graph,
                          precision=PRECISION["value"])

    built = engine(chunk or vectorize)
    if vectorize and not built.vectorized:
        # The CPU auto rule chose task by task for tasks this large; time the vectorized path with
        # the largest chunk that fits one call all the same.
        built = engine(largest_cpu_chunk(len(xs), xs.shape[1] + xq.shape[1], built.activation_bytes_per_example))
    built.train()
    if not cuda_graph:
        return built.meta_step
    if built.execution.name != "cuda-graph":
        raise RuntimeError(f"our meta-iteration could not be captured: {built.eager_reason}")
    torch.cuda.synchronize(xs.device)
    torch.cuda.reset_peak_memory_stats(xs.device)
    base = torch.cuda.memory_allocated(xs.device)
    for _ in range(CapturedExecution.WARMUP_ITERATIONS + 1):  # warm up, capture, replay once
        built.meta_step()
    if built.execution.name != "cuda-graph":
        raise RuntimeError(f"our meta-iteration could not be captured: {built.eager_reason}")

    def replay():
        return built.meta_step()

    replay.peak_bytes = torch.cuda.max_memory_allocated(xs.device) - base
    return replay


def at_precision(make_step):
    """Wrap another framework's (or the textbook's) implementation: it gets the network as
    ``nn.Module`` layers compute it (the plain block order and PyTorch's derivatives, none of ours),
    and its meta-iteration runs at the benchmark's precision."""

    def build(model, tasks, steps):
        plain = use_closed_form_norm_grads(use_grouped_conv_grads(in_block_order(model, False), False), False)
        step = make_step(plain, tasks, steps)
        device = tasks[0].device

        def run():
            with precision_scope(PRECISION["value"], device):
                step()

        return run

    return build


def learn2learn_maml(first_order, model, tasks, steps):
    from bilevel_maml.data._learn2learn import import_learn2learn

    l2l = import_learn2learn()
    xs, ys, xq, yq = tasks
    maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR)

    def step():
        optimizer.zero_grad()
        for i in range(len(xs)):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
            (F.cross_entropy(learner(xq[i]), yq[i]) / len(xs)).backward()
        optimizer.step()

    return step


def functional_loss(model):
    """``loss(params, x, y)``: the model's cross-entropy with ``params`` in place of its parameters."""
    names = [n for n, _ in model.named_parameters()]

    def loss(params, x, y):
        return F.cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), y)

    return loss


def textbook_maml(model, tasks, steps):
    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    loss = functional_loss(model)

    def step():
        optimizer.zero_grad()
        for i in range(len(xs)):
            params = list(model.parameters())
            for _ in range(steps):
                grads = torch.autograd.grad(loss(params, xs[i], ys[i]), params, create_graph=True)
                params = [p - INNER_LR * g for p, g in zip(params, grads)]
            (loss(params, xq[i], yq[i]) / len(xs)).backward()
        optimizer.step()

    return step


def torch_func_sketch(model, tasks, steps):
    """MAML in a few lines of torch.func, the whole meta-batch in one vmap with θ unbatched (the
    formulation of the issue's sketch): a reference for how fast plain vmap gets on this machine.
    Its meta-gradient is wrong with training-mode BatchNorm on current PyTorch (vmap over
    torch.func.grad uses a wrong batch_norm backward batching rule); see tests/test_benchmark_script.py."""
    from torch.func import grad, vmap

    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    loss = functional_loss(model)

    def query_loss(params, xs_i, ys_i, xq_i, yq_i):
        for _ in range(steps):
            params = tuple(p - INNER_LR * g for p, g in zip(params, grad(loss)(params, xs_i, ys_i)))
        return loss(params, xq_i, yq_i)

    def step():
        optimizer.zero_grad()
        theta = tuple(model.parameters())
        vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(theta, xs, ys, xq, yq).mean().backward()
        optimizer.step()

    return step


# -- other formulations of MAML's exact meta-gradient, timed to see whether any beats ours on CPU ---
def _summed_loss(model):
    """``summed(params, x, y)``: the sum over tasks of each task's loss, ``params`` batched by task. Its
    gradient holds every task's own gradient, and it is taken outside ``vmap`` (BatchNorm-safe)."""
    from torch.func import vmap

    loss = functional_loss(model)
    return lambda params, x, y: vmap(loss)(params, x, y).sum()


def forward_over_reverse_maml(model, tasks, steps):
    """MAML's meta-gradient as (I - αH_k)…(I - αH_1)·∇L_query, each Hessian-vector product taken
    forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``) at the stored inner iterate: no
    graph of the inner loop is kept, only its k parameter sets."""
    from torch.func import grad, jvp

    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    summed = _summed_loss(model)
    support_gradient = grad(summed)

    def step():
        optimizer.zero_grad()
        # contiguous: jvp's dual tensors cannot alias one memory location across tasks
        params = tuple(p.detach().expand(len(xs), *p.shape).contiguous() for p in model.parameters())
        iterates = []
        for _ in range(steps):
            iterates.append(params)
            params = tuple(p - INNER_LR * g for p, g in zip(params, support_gradient(params, xs, ys)))
        vector = tuple(g / len(xs) for g in grad(summed)(params, xq, yq))
        for point in reversed(iterates):
            _, hessian_vector = jvp(lambda p: support_gradient(p, xs, ys), (point,), (vector,))
            vector = tuple(v - INNER_LR * h for v, h in zip(vector, hessian_vector))
        for p, g in zip(model.parameters(), vector):
            p.grad = g.sum(0)
        optimizer.step()

    return step


def compiled_maml(model, tasks, steps, cuda_graph=False):
    """The whole meta-loss of the meta-batch (inner steps included) compiled by ``torch.compile``
    (Inductor fuses the element-wise work of forward, backward and double backward); per-task
    gradients are taken outside ``vmap``. The first call compiles (minutes on this CPU).

    ``cuda_graph``: compiled with ``mode="reduce-overhead"``, so that the fused kernels of the forward
    and of the backward each replay as one CUDA graph, and the outer step is fused Adam: on a GPU, the
    fusion XLA gives JAX's row plus the launch-free replay of our captured row."""
    from torch.func import grad, vmap

    xs, ys, xq, yq = tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR, **({"fused": True} if cuda_graph else {}))
    loss, summed = functional_loss(model), _summed_loss(model)

    def meta_loss(theta, xs, ys, xq, yq):
        params = tuple(t.expand(len(xs), *t.shape) for t in theta)
        for _ in range(steps):
            params = tuple(p - INNER_LR * g for p, g in zip(params, grad(summed)(params, xs, ys)))
        return vmap(loss)(params, xq, yq).mean()

    compiled = torch.compile(meta_loss, fullgraph=True, mode="reduce-overhead" if cuda_graph else None)

    def step():
        if cuda_graph:
            torch.compiler.cudagraph_mark_step_begin()  # the previous iteration's graph outputs are dead
        optimizer.zero_grad()
        compiled(tuple(model.parameters()), xs, ys, xq, yq).backward()
        optimizer.step()

    return step


class PrimitiveBatchNorm(torch.nn.Module):
    """Transductive BatchNorm written with mean, variance and arithmetic instead of the fused kernel,
    so that autograd differentiates those primitives twice instead of PyTorch's batch-norm backward."""

    def __init__(self, norm: torch.nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.view(1, -1, 1, 1)


def with_primitive_norm(model: Conv4) -> Conv4:
    """``model`` with each BatchNorm replaced by :class:`PrimitiveBatchNorm` (same parameters)."""
    for block in model.features:
        block[1] = PrimitiveBatchNorm(block[1])
    return model


class UnfoldedConv2d(Conv2d):
    """A 3×3 convolution as image patches (``F.unfold``) times the flattened filters. Under vmap a
    convolution with per-task filters becomes a grouped one; with one input channel (Omniglot's first
    layer) cuDNN runs it in PyTorch's depthwise kernel (0.63 ms of the 11.4 ms captured meta-iteration
    on the H100), while this is a batched matrix product over 9-value patches."""

    def _conv_forward(self, input, weight, bias):
        batch, _, height, width = input.shape
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        out = weight.flatten(1) @ F.unfold(input, (kh, kw), padding=(ph, pw), stride=(sh, sw))
        out = out.view(batch, -1, (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1)
        return out if bias is None else out + bias.view(1, -1, 1, 1)


def with_unfolded_first_conv(model: Conv4) -> Conv4:
    """``model`` whose first convolution is an :class:`UnfoldedConv2d` (the same parameters)."""
    conv = model.features[0][0]
    if conv.dilation != (1, 1) or conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("the unfolded convolution covers undilated, ungrouped convolutions with numeric zero padding")
    unfolded = UnfoldedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    unfolded.weight, unfolded.bias = conv.weight, conv.bias
    model.features[0][0] = unfolded
    return model


def in_block_order(model: Conv4, pool_before_norm: bool) -> Conv4:
    """``model`` computing its max-pool blocks in the given order (:class:`bilevel_maml.models.ConvBlock`),
    whatever it was built with."""
    if pool_before_norm and model.downsample != "max-pool":
        raise ValueError(f"pool before norm reorders max-pool blocks; this conv4 has downsample={model.downsample!r}")
    for block in model.features:
        block.pool_before_norm = pool_before_norm
    return model


IMPLEMENTATIONS = {
    "ours maml vectorized": lambda m, t, k: ours("maml", True, m, t, k),
    "ours maml vectorized x8": lambda m, t, k: ours("maml", True, m, t, k, chunk=8),
    "ours maml per-task": lambda m, t, k: ours("maml", False, m, t, k),
    "ours fomaml vectorized": lambda m, t, k: ours("fomaml", True, m, t, k),
    "ours fomaml per-task": lambda m, t, k: ours("fomaml", False, m, t, k),
    "ours imaml vectorized": lambda m, t, k: ours("imaml", True, m, t, k),
    "ours imaml per-task": lambda m, t, k: ours("imaml", False, m, t, k),
    "ours maml vectorized (cuda graph)": lambda m, t, k: ours("maml", True, m, t, k, cuda_graph=True),
    "ours maml vectorized pool before norm (cuda graph)":
        lambda m, t, k: ours("maml", True, in_block_order(m, True), t, k, cuda_graph=True),
    "ours maml vectorized plain block order (cuda graph)":
        lambda m, t, k: ours("maml", True, in_block_order(m, False), t, k, cuda_graph=True),
    "ours maml vectorized unfolded first conv (cuda graph)":
        lambda m, t, k: ours("maml", True, with_unfolded_first_conv(m), t, k, cuda_graph=True),
    "ours maml vectorized grouped conv grads (cuda graph)":
        lambda m, t, k: ours("maml", True, use_grouped_conv_grads(m), t, k, cuda_graph=True),
    "ours imaml vectorized grouped conv grads (cuda graph)":
        lambda m, t, k: ours("imaml", True, use_grouped_conv_grads(m), t, k, cuda_graph=True),
    "ours maml vectorized pytorch norm grads (cuda graph)":
        lambda m, t, k: ours("maml", True, use_closed_form_norm_grads(m, False), t, k, cuda_graph=True),
    "ours maml vectorized channels last (cuda graph)":
        lambda m, t, k: ours("maml", True, m.to(memory_format=torch.channels_last), t, k, cuda_graph=True),
    "ours fomaml vectorized (cuda graph)": lambda m, t, k: ours("fomaml", True, m, t, k, cuda_graph=True),
    "ours imaml vectorized (cuda graph)": lambda m, t, k: ours("imaml", True, m, t, k, cuda_graph=True),
    "learn2learn maml": at_precision(lambda m, t, k: learn2learn_maml(False, m, t, k)),
    "learn2learn fomaml": at_precision(lambda m, t, k: learn2learn_maml(True, m, t, k)),
    "textbook maml loop": at_precision(textbook_maml),
    "torch.func vmap sketch": at_precision(torch_func_sketch),
    "forward-over-reverse maml": at_precision(forward_over_reverse_maml),
    "torch.compile maml": at_precision(compiled_maml),
    "torch.compile maml (cuda graph)": at_precision(lambda m, t, k: compiled_maml(m, t, k, cuda_graph=True)),
    "ours maml vectorized (pool before norm)": lambda m, t, k: ours("maml", True, in_block_order(m, True), t, k),
    "ours maml per-task (pool before norm)": lambda m, t, k: ours("maml", False, in_block_order(m, True), t, k),
    "ours fomaml vectorized (pool before norm)":
        lambda m, t, k: ours("fomaml", True, in_block_order(m, True), t, k),
    "ours imaml vectorized (pool before norm)": lambda m, t, k: ours("imaml", True, in_block_order(m, True), t, k),
    "ours maml vectorized (plain block order)": lambda m, t, k: ours("maml", True, in_block_order(m, False), t, k),
    "ours maml vectorized (grouped conv grads)": lambda m, t, k: ours("maml", True, use_grouped_conv_grads(m), t, k),
    "ours imaml vectorized (grouped conv grads)": lambda m, t, k: ours("imaml", True, use_grouped_conv_grads(m), t, k),
    "ours maml vectorized (pytorch norm grads)":
        lambda m, t, k: ours("maml", True, use_closed_form_norm_grads(m, False), t, k),
    "ours imaml vectorized (pytorch norm grads)":
        lambda m, t, k: ours("imaml", True, use_closed_form_norm_grads(m, False), t, k),
    "ours maml per-task (pytorch norm grads)":
        lambda m, t, k: ours("maml", False, use_closed_form_norm_grads(m, False), t, k),
    "ours fomaml vectorized (pytorch norm grads)":
        lambda m, t, k: ours("fomaml", True, use_closed_form_norm_grads(m, False), t, k),
    "ours maml vectorized (unfolded first conv)": lambda m, t, k: ours("maml", True, with_unfolded_first_conv(m), t, k),
    "ours maml vectorized (primitive-op norm)":
        lambda m, t, k: ours("maml", True, with_primitive_norm(in_block_order(m, False)), t, k),
    "jax maml (jit + vmap)": lambda m, t, k: jax_row(m, t, k),
}
#: rows that need CUDA, and rows that need an optional package
CUDA_ONLY = {name for name in IMPLEMENTATIONS if name.endswith("(cuda graph)")}
#: what each implementation is compared with: learn2learn at the same order of derivatives
BASELINE = {"maml": "learn2learn maml", "imaml": "learn2learn maml", "fomaml": "learn2learn fomaml"}


def jax_row(model, tasks, steps):
    import jax_maml

    step = jax_maml.meta_step(model, tasks, steps, inner_lr=INNER_LR, meta_lr=META_LR, precision=PRECISION["value"])
    step.peak_bytes = None  # JAX's allocator is its own
    return step


def jax_available() -> bool:
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def algorithm_of(name: str) -> str:
    """The algorithm an implementation computes (its FLOPs and its learn2learn baseline)."""
    return "fomaml" if "fomaml" in name else "imaml" if "imaml" in name else "maml"

