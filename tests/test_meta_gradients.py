"""θ.grad after one meta-iteration against references computed here, in float64."""

import copy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel_maml import MetaEngine
from bilevel_maml.problems import (
    FOMAMLLower,
    FOMAMLUpper,
    IMAMLLower,
    IMAMLUpper,
    MAMLLower,
    MAMLUpper,
    MetaLearner,
)
from bilevel_maml.models import Conv4
from betty.configs import Config

from conftest import RecordingEnv, RecordingSGD, functional, random_classification_source

INNER_LR = 0.3


def tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def tiny_conv_bn():
    torch.manual_seed(0)
    return Conv4(ways=5, in_channels=1, hidden=4, image_size=16).double()


def image_source():
    def sample():
        labels = torch.arange(5).repeat_interleave(2)
        return torch.randn(10, 1, 16, 16, dtype=torch.float64) + labels.view(-1, 1, 1, 1), labels

    return sample


def one_meta_iteration(upper_cls, lower_cls, model, source, inner_steps, meta_batch_size, **lower_kwargs):
    env = RecordingEnv(source, ways=5, shots=1, query_shots=1, seed=7)
    optimizer = RecordingSGD(model.parameters())
    upper = upper_cls(model, optimizer, meta_batch_size=meta_batch_size)
    lower = lower_cls(model, inner_lr=INNER_LR, inner_steps=inner_steps, **lower_kwargs)
    MetaEngine(upper, lower, env, meta_iterations=1).run()
    assert len(optimizer.seen_grads) == 1
    return optimizer.seen_grads[0], env.episodes


def unrolled_maml_gradient(model, episode, steps, create_graph):
    """The textbook definition: k explicit SGD steps, query loss, grad w.r.t. θ (or φ_k)."""
    forward = functional(model)
    (xs, ys), (xq, yq) = episode
    theta = list(model.parameters())
    phi = theta if create_graph else [p.detach().requires_grad_() for p in theta]
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi, create_graph=create_graph)
        phi = [p - INNER_LR * g for p, g in zip(phi, grads)]
        if not create_graph:
            phi = [p.detach().requires_grad_() for p in phi]
    return torch.autograd.grad(F.cross_entropy(forward(phi, xq), yq), theta if create_graph else phi)


def assert_close(actual, expected, tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=tol, rtol=0), (a - e).abs().max().item()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("make_model,source", [(tanh_mlp, None), (tiny_conv_bn, image_source)],
                         ids=["mlp", "conv-transductive-bn"])
def test_maml_gradient_is_the_unrolled_second_order_gradient(steps, make_model, source):
    model = make_model()
    source = source() if source else random_classification_source(5, 2, 6)
    got, episodes = one_meta_iteration(MAMLUpper, MAMLLower, model, source, steps, meta_batch_size=2)
    per_task = [unrolled_maml_gradient(model, e, steps, create_graph=True) for e in episodes]
    expected = [(a + b) / 2 for a, b in zip(*per_task)]
    assert_close(got, expected, 1e-6)
    # The second-order terms are really there: the first-order answer is measurably different.
    first_order = [unrolled_maml_gradient(model, e, steps, create_graph=False) for e in episodes]
    gap = max((g - (a + b) / 2).abs().max().item() for g, a, b in zip(got, *first_order))
    assert gap > 1e-4


@pytest.mark.parametrize("steps", [1, 3])
def test_fomaml_gradient_is_the_query_gradient_at_the_adapted_weights(steps):
    model = tanh_mlp()
    got, episodes = one_meta_iteration(
        FOMAMLUpper, FOMAMLLower, model, random_classification_source(5, 2, 6), steps, meta_batch_size=2
    )
    per_task = [unrolled_maml_gradient(model, e, steps, create_graph=False) for e in episodes]
    assert_close(got, [(a + b) / 2 for a, b in zip(*per_task)], 1e-6)


# -- iMAML on ridge regression, where the implicit gradient has a closed form -------------------
D, N_SUPPORT, N_QUERY, LAM = 5, 12, 12, 0.7


def ridge_source():
    w = torch.randn(D, 1, dtype=torch.float64)

    def sample():
        x = torch.randn(N_SUPPORT + N_QUERY, D, dtype=torch.float64)
        return x, x @ w + 0.3 * torch.randn(len(x), 1, dtype=torch.float64)

    return sample


def closed_form_imaml_gradient(theta, episode):
    (xs, ys), (xq, yq) = episode
    hessian = 2.0 / len(xs) * xs.T @ xs  # of the support MSE
    eye = torch.eye(D, dtype=torch.float64)
    phi_star = torch.linalg.solve(hessian + LAM * eye, 2.0 / len(xs) * xs.T @ ys + LAM * theta)
    query_grad = 2.0 / len(xq) * xq.T @ (xq @ phi_star - yq)
    return torch.linalg.solve(eye + hessian / LAM, query_grad)


def run_ridge(upper, lower, model, optimizer):
    env = RecordingEnv(ridge_source(), shots=N_SUPPORT, query_shots=N_QUERY, regression=True, seed=3)
    MetaEngine(upper, lower, env, meta_iterations=1).run()
    theta = model.weight.detach().T
    expected = sum(closed_form_imaml_gradient(theta, e) for e in env.episodes) / len(env.episodes)
    return optimizer.seen_grads[0][0].T, expected


def ridge_model():
    torch.manual_seed(1)
    return nn.Linear(D, 1, bias=False).double()


def test_imaml_gradient_matches_the_closed_form_implicit_gradient():
    model = ridge_model()
    optimizer = RecordingSGD(model.parameters())
    upper = IMAMLUpper(model, optimizer, meta_batch_size=2, loss_fn=F.mse_loss, cg_iterations=D)
    lower = IMAMLLower(model, inner_lr=0.1, inner_steps=600, loss_fn=F.mse_loss, lam=LAM)
    got, expected = run_ridge(upper, lower, model, optimizer)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


def test_the_implicit_correction_is_material_in_this_setup():
    """Guards the test above: (I + H/λ)^-1 changes the query gradient by far more than 1e-4."""
    theta = ridge_model().weight.detach().T
    x, y = ridge_source()()
    (xs, ys), (xq, yq) = (x[:N_SUPPORT], y[:N_SUPPORT]), (x[N_SUPPORT:], y[N_SUPPORT:])
    implicit = closed_form_imaml_gradient(theta, ((xs, ys), (xq, yq)))
    hessian = 2.0 / len(xs) * xs.T @ xs
    eye = torch.eye(D, dtype=torch.float64)
    phi_star = torch.linalg.solve(hessian + LAM * eye, 2.0 / len(xs) * xs.T @ ys + LAM * theta)
    first_order = 2.0 / len(xq) * xq.T @ (xq @ phi_star - yq)
    assert (implicit - first_order).abs().max() > 1e-2


def test_imaml_with_too_few_cg_iterations_is_only_approximate():
    model = ridge_model()
    optimizer = RecordingSGD(model.parameters())
    upper = IMAMLUpper(model, optimizer, meta_batch_size=2, loss_fn=F.mse_loss, cg_iterations=1)
    lower = IMAMLLower(model, inner_lr=0.1, inner_steps=600, loss_fn=F.mse_loss, lam=LAM)
    got, expected = run_ridge(upper, lower, model, optimizer)
    assert (got - expected).abs().max() > 1e-3


def test_betty_style_cg_path_through_the_generic_meta_learner_matches_the_closed_form():
    """A variant that relies on Betty's hypergradient path (config.type="cg") gets our fixed CG."""
    model = ridge_model()
    optimizer = RecordingSGD(model.parameters())
    upper = MetaLearner(model, optimizer, meta_batch_size=2, loss_fn=F.mse_loss)
    lower = IMAMLLower(model, inner_lr=0.1, loss_fn=F.mse_loss, lam=LAM,
                       config=Config(type="cg", unroll_steps=600, cg_iterations=D))
    got, expected = run_ridge(upper, lower, model, optimizer)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "imaml", "metasgd", "anil", "reptile", "maml++"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_a_frozen_layer_is_a_constant_of_the_inner_loop_and_of_the_outer_step(algorithm, vectorize):
    """A parameter with requires_grad=False is held fixed: the meta-gradients of the others (and of their
    learned step sizes) equal those of the same learner without that layer, fed the layer's fixed outputs
    as inputs, and the outer step leaves the layer as it was (some algorithms adapted and stepped it,
    the others failed inside torch)."""
    from bilevel_maml import ALGORITHMS
    from bilevel_maml.env import EpisodicEnv

    torch.manual_seed(0)
    frozen = nn.Linear(6, 8).double().requires_grad_(False)
    rest = nn.Sequential(nn.Tanh(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    whole = nn.Sequential(frozen, *rest)
    without = copy.deepcopy(rest)
    source = random_classification_source(5, 2, 6)

    def through_frozen():
        inputs, labels = source()
        with torch.no_grad():
            return frozen(inputs), labels

    def meta_gradients(model, tasks):
        upper_cls, lower_cls = ALGORITHMS[algorithm]
        optimizer = RecordingSGD(model.parameters(), lr=0.1)
        upper = upper_cls(model, optimizer, meta_batch_size=4)
        lower = lower_cls(model, inner_lr=INNER_LR, inner_steps=2)  # (ANIL: the last layer)
        env = EpisodicEnv(tasks, ways=5, shots=1, query_shots=1, seed=4)
        MetaEngine(upper, lower, env, meta_iterations=2, vectorize=vectorize, valid_env=None).run()
        return optimizer.seen_grads

    weight, bias = frozen.weight.clone(), frozen.bias.clone()
    with_frozen, reference = meta_gradients(whole, source), meta_gradients(without, through_frozen)
    assert len(with_frozen) == len(reference) == 2
    for seen, expected in zip(with_frozen, reference):
        # θ's gradients, then (Meta-SGD, MAML++) those of one step size per parameter of θ
        is_frozen = [True, True, False, False, False, False] * (len(seen) // 6)
        assert len(seen) == 6 * len(expected) // 4
        assert all(g is None or not g.any() for g, f in zip(seen, is_frozen) if f)
        for a, b in zip([g for g, f in zip(seen, is_frozen) if not f], expected):
            assert torch.allclose(a, b, atol=1e-10, rtol=0), (a - b).abs().max()
    assert torch.equal(frozen.weight, weight) and torch.equal(frozen.bias, bias)


def test_imaml_refuses_an_inner_loop_that_keeps_a_trainable_parameter_at_theta():
    """(I + H/λ)⁻¹ ∇L_query is the implicit gradient only for parameters the proximal inner problem
    optimises; an iMAML variant adapting the head alone would get a wrong gradient for the body, so it
    is refused in the first meta-iteration, before θ changes."""
    class HeadOnlyIMAMLLower(IMAMLLower):
        def adapts(self, name):
            return name.startswith("2.")

    model = tanh_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    engine = MetaEngine(IMAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=2),
                        HeadOnlyIMAMLLower(model, inner_lr=INNER_LR), env, meta_iterations=1, vectorize=False)
    with pytest.raises(ValueError, match=r"iMAML's implicit gradient needs the inner loop to adapt every trainable "
                                         r"parameter, but HeadOnlyIMAMLLower.adapts\(\) keeps 0.weight, 0.bias at θ"):
        engine.run()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
