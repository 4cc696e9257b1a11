"""MAML++ against a reference written out here in float64: the multi-step loss with its annealed
weights, learned per-layer per-step step sizes, per-step BatchNorm, derivative-order annealing,
per-step running statistics at evaluation, and the cosine outer learning rate."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel_maml import MetaEngine, build_engine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.evaluation import score_tasks
from bilevel_maml.models import Conv4
from bilevel_maml.problems import MAMLPlusPlusLower, MAMLPlusPlusUpper, PerStepBatchNorm
from bilevel_maml.problems.base import cosine_learning_rate
from bilevel_maml.problems.mamlpp import multi_step_weights

from conftest import RecordingEnv, RecordingSGD, random_classification_source
from test_vectorized import image_source

INNER_LR = 0.3
EPS = 1e-5
ADAPTED = (0, 1, 4, 5)  # the two Linear layers; the BatchNorm's per-step γ/β are meta-learned only


def bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Tanh(),
                         nn.Linear(8, 5)).double()


def reference_forward(theta, x, step, statistics=None):
    """The network by hand: per-step γ/β rows, batch statistics (or the given running ones)."""
    w1, b1, gamma, beta, w2, b2 = theta
    h = x @ w1.T + b1
    if statistics is None:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = statistics[0][step], statistics[1][step]
    h = torch.tanh(gamma[step] * (h - mean) / torch.sqrt(var + EPS) + beta[step])
    return h @ w2.T + b2


def reference_gradient(theta, rates, episodes, steps, weights, second_order=True):
    """d/d(θ, α) of the mean over tasks of Σ_k w_k L_query(φ_{k+1}, step k), with
    φ_{k+1} = φ_k − α[k] ∇L_support(φ_k, step k) on the adapted tensors."""
    theta = [p.detach().clone().requires_grad_() for p in theta]
    rates = [r.detach().clone().requires_grad_() for r in rates]
    total = 0.0
    for (xs, ys), (xq, yq) in episodes:
        phi = list(theta)
        losses = []
        for k in range(steps):
            adapted = [phi[i] for i in ADAPTED]
            grads = torch.autograd.grad(F.cross_entropy(reference_forward(phi, xs, k), ys), adapted,
                                        create_graph=second_order)
            for i, g in zip(ADAPTED, grads):
                phi[i] = phi[i] - rates[i][k] * g
            losses.append(F.cross_entropy(reference_forward(phi, xq, k), yq))
        total = total + sum(w * loss for w, loss in zip(weights, losses)) / len(episodes)
    grads = torch.autograd.grad(total, theta + rates, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta + rates)]


def run(steps, meta_iterations=1, lower_options=None, upper_options=None, model=None, lr=0.0, vectorize=False):
    model = model if model is not None else bn_mlp()
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    optimizer = RecordingSGD(model.parameters(), lr=lr)
    upper = MAMLPlusPlusUpper(model, optimizer, meta_batch_size=2, **{"cosine_lr": False, **(upper_options or {})})
    lower = MAMLPlusPlusLower(model, inner_lr=INNER_LR, inner_steps=steps, **(lower_options or {}))
    theta = [p.detach().clone() for p in model.parameters()]
    engine = MetaEngine(upper, lower, env, meta_iterations=meta_iterations, vectorize=vectorize)
    engine.run()
    return engine, optimizer, theta, env.episodes


def assert_close(actual, expected, tol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=tol, rtol=0), (a - e).abs().max().item()


def test_multi_step_weights_start_equal_and_anneal_toward_the_last_step():
    assert multi_step_weights(3, 1, 4) == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    # two iterations done, 1/(3·4) off each earlier step per iteration, (3−1)/(3·4) onto the last
    assert multi_step_weights(3, 3, 4) == pytest.approx([1 / 6, 1 / 6, 2 / 3])
    assert multi_step_weights(3, 100, 4) == pytest.approx([0.01, 0.01, 0.98])  # floors at 0.03/K
    assert sum(multi_step_weights(5, 7, 10)) == pytest.approx(1.0)


@pytest.mark.parametrize("steps", [1, 3])
def test_gradients_of_theta_step_sizes_and_per_step_bn_equal_the_unrolled_reference(steps):
    """Second order throughout; iteration 2 uses the annealed weights of iteration 2 (lr 0: θ and α
    stay where the reference needs them)."""
    anneal = 3
    engine, optimizer, theta, episodes = run(
        steps, meta_iterations=2, lower_options={"first_order_iterations": 0},
        upper_options={"multi_step_loss_iterations": anneal})
    lower = engine.task_learner
    assert [type(m) for m in engine.meta_learner.module] == [nn.Linear, PerStepBatchNorm, nn.Tanh, nn.Linear]
    assert theta[2].shape == theta[3].shape == (steps, 8)  # one γ and β row per step
    rates = [torch.full((steps,), INNER_LR, dtype=torch.float64) for _ in theta]
    assert list(optimizer.param_groups[1]["params"]) == list(lower.learning_rates)
    for iteration in (1, 2):
        weights = multi_step_weights(steps, iteration, anneal) if steps > 1 else [1.0]
        expected = reference_gradient(theta, rates, episodes[2 * (iteration - 1):2 * iteration], steps, weights)
        assert_close(optimizer.seen_grads[iteration - 1], expected)
    got = optimizer.seen_grads[1]
    assert got[2].abs().max() > 1e-4 and got[3].abs().max() > 1e-4  # the BN rows are learned
    assert all(got[6 + i].abs().max() > 1e-4 for i in (0, 4, 5))  # and the step sizes (b1 feeds BN: none)
    if steps > 1:
        assert not torch.allclose(got[2][0], torch.zeros_like(got[2][0]))  # an early step's γ is reached too


def test_with_annealing_the_first_iterations_take_the_first_order_gradient_then_second_order():
    steps = 3
    engine, optimizer, theta, episodes = run(steps, meta_iterations=2, lower_options={"first_order_iterations": 1},
                                             upper_options={"multi_step_loss": False})
    rates = [torch.full((steps,), INNER_LR, dtype=torch.float64) for _ in theta]
    last_only = [0.0] * (steps - 1) + [1.0]
    first = reference_gradient(theta, rates, episodes[:2], steps, last_only, second_order=False)
    second = reference_gradient(theta, rates, episodes[2:], steps, last_only, second_order=True)
    assert_close(optimizer.seen_grads[0], first)
    assert_close(optimizer.seen_grads[1], second)
    exact_first = reference_gradient(theta, rates, episodes[:2], steps, last_only, second_order=True)
    assert max((a - b).abs().max() for a, b in zip(first, exact_first)) > 1e-4  # the two orders differ here
    assert engine.task_learner.second_order


def test_the_default_first_order_phase_is_the_first_third_of_the_run():
    lower = MAMLPlusPlusLower(bn_mlp(), inner_lr=0.1, inner_steps=2)
    orders = []
    for iteration in range(1, 10):
        lower.on_meta_iteration_start(iteration, 9)
        orders.append(lower.second_order)
    assert orders == [False] * 3 + [True] * 6


def test_evaluation_normalises_each_step_with_that_steps_running_statistics():
    steps = 3
    model = bn_mlp()
    upper = MAMLPlusPlusUpper(model, torch.optim.SGD(model.parameters(), lr=0.0), meta_batch_size=2, cosine_lr=False)
    lower = MAMLPlusPlusLower(model, inner_lr=INNER_LR, inner_steps=steps, per_step_bn_statistics=True)
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    engine = MetaEngine(upper, lower, env, meta_iterations=1, vectorize=False)
    layer = model[1]
    torch.manual_seed(1)
    with torch.no_grad():  # rows far apart, so that using another row (or the batch) shows
        layer.running_mean.copy_(torch.randn(steps, 8, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(steps, 8, dtype=torch.float64) * 3 + 0.2)
        layer.weight.copy_(1 + torch.rand(steps, 8, dtype=torch.float64))
    theta = [p.detach().clone() for p in model.parameters()]
    statistics = (layer.running_mean.clone(), layer.running_var.clone())
    (xs, ys), (xq, yq) = env.sample_task()

    def reference_loss(rows):
        phi = [p.clone().requires_grad_() for p in theta]
        for k in range(len(rows) - 1):
            adapted = [phi[i] for i in ADAPTED]
            grads = torch.autograd.grad(F.cross_entropy(reference_forward(phi, xs, rows[k], statistics), ys), adapted)
            for i, g in zip(ADAPTED, grads):
                phi[i] = (phi[i] - INNER_LR * g).detach().requires_grad_()
        return F.cross_entropy(reference_forward(phi, xq, rows[-1], statistics), yq).item()

    engine.eval()
    got = score_tasks(lower, F.cross_entropy, (xs, ys), (xq, yq), stacked=False)["loss"].item()
    stacked = score_tasks(lower, F.cross_entropy, (xs[None], ys[None]), (xq[None], yq[None]), stacked=True)
    longer = score_tasks(lower, F.cross_entropy, (xs, ys), (xq, yq), stacked=False, steps=5)["loss"].item()
    curve = score_tasks(lower, F.cross_entropy, (xs, ys), (xq, yq), stacked=False, per_step=True)["loss_per_step"]
    engine.train()
    # after k steps the query is normalised with the row of the last step taken (row 0 for θ itself)
    assert curve[0].tolist() == pytest.approx([reference_loss(rows) for rows in ([0], [0, 0], [0, 1, 1], [0, 1, 2, 2])],
                                              abs=1e-6)
    expected = reference_loss([0, 1, 2, 2])  # support at step k with row k; the query as at the last step
    assert got == pytest.approx(expected, abs=1e-6)
    assert stacked["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert longer == pytest.approx(reference_loss([0, 1, 2, 2, 2, 2]), abs=1e-6)  # steps past the last: its row
    assert abs(reference_loss([2, 2, 2, 2]) - expected) > 1e-3  # the last step's statistics give another loss
    with torch.no_grad():
        layer.statistics = False  # batch statistics
        batch = score_tasks(lower, F.cross_entropy, (xs, ys), (xq, yq), stacked=False)["loss"].item()
        layer.statistics = True
    assert abs(batch - expected) > 1e-3


def support_statistics(theta, xs):
    h = xs @ theta[0].T + theta[1]
    return h.mean(0), h.var(0, unbiased=True)


@pytest.mark.parametrize("vectorize", [False, True, 2], ids=["per-task", "vectorized", "chunked"])
def test_training_keeps_each_steps_running_statistics_of_the_support_sets(vectorize):
    """Step 0 normalises θ's features: its running statistics are the mean over the meta-batch of
    the support sets' mean and unbiased variance — exactly at the first commit, then a running mean."""
    model = bn_mlp()
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    upper = MAMLPlusPlusUpper(model, torch.optim.SGD(model.parameters(), lr=0.0), meta_batch_size=4, cosine_lr=False)
    lower = MAMLPlusPlusLower(model, inner_lr=INNER_LR, inner_steps=2, per_step_bn_statistics=True)
    theta = [p.detach().clone() for p in model.parameters()]
    engine = MetaEngine(upper, lower, env, meta_iterations=2, vectorize=vectorize)
    engine.run()
    per_iteration = []
    for start in (0, 4):
        found = [support_statistics(theta, xs) for (xs, _), _ in env.episodes[start:start + 4]]
        per_iteration.append([torch.stack([f[i] for f in found]).mean(0) for i in range(2)])
    layer = model[1]
    for i, buffer in enumerate((layer.running_mean, layer.running_var)):
        expected = (per_iteration[0][i] + per_iteration[1][i]) / 2  # weight max(momentum, 1/commits)
        assert torch.allclose(buffer[0], expected, atol=1e-10), (buffer[0] - expected).abs().max()
    assert layer.commits.item() == 2
    assert not torch.allclose(layer.running_mean[1], layer.running_mean[0])  # step 1 saw adapted weights


def test_per_task_vectorized_and_chunked_runs_agree_on_everything_maml_plus_plus_learns():
    """Conv4 (per-step BN over images), three steps, all pieces on, 2 meta-iterations with a moving θ."""
    results = []
    for vectorize in (False, True, 2):
        torch.manual_seed(0)
        model = Conv4(5, in_channels=1, hidden=4, image_size=16).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        upper = MAMLPlusPlusUpper(model, optimizer, meta_batch_size=4, multi_step_loss_iterations=4)
        lower = MAMLPlusPlusLower(model, inner_lr=0.2, inner_steps=3, per_step_bn_statistics=True,
                                  first_order_iterations=1)
        env = EpisodicEnv(image_source(), ways=5, shots=1, query_shots=2, seed=9)
        MetaEngine(upper, lower, env, meta_iterations=2, vectorize=vectorize).run()
        results.append([*model.state_dict().values(), *lower.learning_rates])
    for other in results[1:]:
        assert_close(other, results[0])
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(results[0], Conv4(5, 1, 4, 16).double().state_dict().values())
               if a.shape == b.shape)


def test_the_outer_learning_rate_follows_the_cosine_to_its_minimum():
    assert cosine_learning_rate(1e-3, 1e-5, 1, 10) == pytest.approx(1e-3)
    assert cosine_learning_rate(1e-3, 1e-5, 6, 10) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    engine = build_engine("maml++", bn_mlp().float(), random_classification_source(5, 2, 6, dtype=torch.float32),
                          ways=5, shots=1, meta_batch_size=2, meta_iterations=10, meta_lr=1e-3, valid_step=10)
    history = engine.run()
    expected = [cosine_learning_rate(1e-3, 1e-5, i, 10) for i in range(1, 11)]
    assert [h["lr"] for h in history] == pytest.approx(expected)
    # the learned step sizes' parameter group is annealed from its own start too
    assert engine.meta_learner.optimizer.param_groups[1]["lr"] == pytest.approx(expected[-1])


def test_options_are_checked_and_the_pieces_switch_off():
    with pytest.raises(ValueError, match="first_order_iterations must be an integer >= 0"):
        MAMLPlusPlusLower(bn_mlp(), inner_lr=0.1, first_order_iterations=-1)
    model = bn_mlp()
    with pytest.raises(ValueError, match="cosine_lr and a scheduler both set"):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        MAMLPlusPlusUpper(model, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1))
    plain = bn_mlp()
    lower = MAMLPlusPlusLower(plain, inner_lr=0.1, inner_steps=2, learned_inner_lr=False, per_step_bn_weights=False,
                              per_step_bn_statistics=False)
    assert lower.meta_parameters() == () and isinstance(plain[1], nn.BatchNorm1d)
    with pytest.raises(ValueError, match="maml\\+\\+ has no option 'multistep'; its options: bn_momentum, cosine_lr"):
        build_engine("maml++", bn_mlp(), random_classification_source(5, 2, 6), ways=5, algorithm_options={"multistep": 1})
