"""Meta-SGD, ANIL, Reptile, BOIL and users' CAVIA and Proto-MAML (examples/cavia.py, examples/protomaml.py), each
one short subclass on the public hooks, against references computed here (MAML++: test_mamlpp.py)."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bilevel_maml import ALGORITHMS, MetaEngine, build_engine
from bilevel_maml.problems import (ANILLower, ANILUpper, BOILLower, BOILUpper, FOMAMLLower, FOMAMLUpper, MAMLLower,
                                   MAMLUpper, MetaSGDLower, MetaSGDUpper, ReptileLower, ReptileUpper)
from bilevel_maml.data import SinusoidTasks
from bilevel_maml.data.device_sampler import DeviceTaskSampler
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.models import REGISTERED_MODELS, Conv4

from conftest import (RecordingEnv, RecordingSGD, first_host_read_in_capturable_region, functional,
                      random_classification_source)

INNER_LR = 0.3
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def run(upper_cls, lower_cls, model, steps, meta_iterations=1, lr=0.0, vectorize=False, **lower_kwargs):
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    optimizer = RecordingSGD(model.parameters(), lr=lr)
    upper = upper_cls(model, optimizer, meta_batch_size=2)
    lower = lower_cls(model, inner_lr=INNER_LR, inner_steps=steps, **lower_kwargs)
    MetaEngine(upper, lower, env, meta_iterations=meta_iterations, vectorize=vectorize).run()
    return optimizer, lower, env.episodes


def assert_close(actual, expected, tol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, atol=tol, rtol=0), (a - e).abs().max().item()


# -- Meta-SGD -------------------------------------------------------------------------------------
def meta_sgd_reference(model, rates, episodes, steps):
    """d/d(θ, α) of the mean query loss after k steps φ ← φ − α ⊙ ∇L_support(φ), written out here."""
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    alpha = [a.detach().clone().requires_grad_() for a in rates]
    total = 0.0
    for (xs, ys), (xq, yq) in episodes:
        phi = theta
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi, create_graph=True)
            phi = [p - a * g for p, a, g in zip(phi, alpha, grads)]
        total = total + F.cross_entropy(forward(phi, xq), yq) / len(episodes)
    return torch.autograd.grad(total, theta + alpha)


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_sgd_learning_rates_get_the_reference_gradient(steps):
    model = tanh_mlp()
    theta_before = [p.detach().clone() for p in model.parameters()]
    optimizer, lower, episodes = run(MetaSGDUpper, MetaSGDLower, model, steps)
    # The rates were added to the outer optimizer as their own parameter group.
    assert [p for p in optimizer.param_groups[1]["params"]] == list(lower.learning_rates)
    got = optimizer.seen_grads[0]
    with torch.no_grad():  # lr 0: θ is where the reference needs it
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), theta_before))
    start_rates = [torch.full_like(p, INNER_LR) for p in model.parameters()]
    expected = meta_sgd_reference(model, start_rates, episodes, steps)
    assert len(got) == 2 * len(theta_before)
    assert_close(got, expected)
    # α's gradient is not trivially zero
    assert max(g.abs().max().item() for g in got[len(theta_before):]) > 1e-4


def test_meta_sgd_learning_rates_change_with_a_meta_update_and_stay_per_parameter():
    model = tanh_mlp()
    _, lower, _ = run(MetaSGDUpper, MetaSGDLower, model, steps=2, meta_iterations=3, lr=0.5)
    for rate in lower.learning_rates:
        assert not torch.allclose(rate, torch.full_like(rate, INNER_LR))
        assert rate.unique().numel() > 1  # one step size per weight, not one per tensor


# -- ANIL -----------------------------------------------------------------------------------------
def partial_adaptation_reference(model, episodes, steps, adapted):
    """Only the parameters at indices ``adapted`` take inner steps, the others keep θ; the query
    loss is differentiated through the steps."""
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0.0
    for (xs, ys), (xq, yq) in episodes:
        phi = list(theta)
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), [phi[i] for i in adapted],
                                        create_graph=True)
            for i, g in zip(adapted, grads):
                phi[i] = phi[i] - INNER_LR * g
        total = total + F.cross_entropy(forward(phi, xq), yq) / len(episodes)
    return torch.autograd.grad(total, theta)


def anil_reference(model, episodes, steps):
    return partial_adaptation_reference(model, episodes, steps, adapted=(2, 3))  # the last layer


class WatchedANIL(ANILLower):
    """Records what each inner step did to every parameter."""

    def inner_update(self, params, grads):
        updated = super().inner_update(params, grads)
        self.steps_seen = getattr(self, "steps_seen", []) + [(params, grads, updated)]
        return updated


def test_anil_rejects_a_head_that_names_no_parameters():
    with pytest.raises(ValueError, match=r"head='fc' names no parameters of Conv4; submodules with parameters: "
                                         r"classifier, features.0.0"):
        ANILLower(Conv4(5, hidden=4, image_size=16), inner_lr=0.1, head="fc")


def test_anil_default_head_of_conv4_is_its_classifier():
    lower = ANILLower(Conv4(5, hidden=4, image_size=16), inner_lr=0.1)
    assert lower.head == "classifier"
    assert [n for n in lower.param_names if lower.adapts(n)] == ["classifier.weight", "classifier.bias"]


# -- Reptile --------------------------------------------------------------------------------------
@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_reptile_moves_theta_by_epsilon_times_the_mean_of_phi_minus_theta(vectorize):
    """θ' = θ + ε·mean_tasks(φ_K − θ), φ_K from K SGD steps on the task's support and query examples."""
    model, steps, epsilon = tanh_mlp(), 3, 0.5
    theta = [p.detach().clone() for p in model.parameters()]
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    upper = ReptileUpper(model, torch.optim.SGD(model.parameters(), lr=epsilon), meta_batch_size=4)
    lower = ReptileLower(model, inner_lr=INNER_LR, inner_steps=steps)
    MetaEngine(upper, lower, env, meta_iterations=1, vectorize=vectorize).run()
    forward = functional(model)
    moves = []
    for (xs, ys), (xq, yq) in env.episodes:
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        phi = [t.clone().requires_grad_() for t in theta]
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, x), y), phi)
            phi = [(p - INNER_LR * g).detach().requires_grad_() for p, g in zip(phi, grads)]
        moves.append([p.detach() - t for p, t in zip(phi, theta)])
    expected = [t + epsilon * torch.stack([m[i] for m in moves]).mean(0) for i, t in enumerate(theta)]
    assert len(env.episodes) == 4
    assert_close(list(model.parameters()), expected, tol=1e-10)
    support_only = [t + epsilon * INNER_LR for t in theta]  # not what Reptile computes: a sanity bar
    assert max((a - b).abs().max() for a, b in zip(model.parameters(), support_only)) > 1e-3


# -- BOIL -----------------------------------------------------------------------------------------
def boil_reference(model, episodes, steps):
    return partial_adaptation_reference(model, episodes, steps, adapted=(0, 1))  # the body


class WatchedBOIL(BOILLower):
    def inner_update(self, params, grads, step):
        updated = super().inner_update(params, grads, step)
        self.steps_seen = getattr(self, "steps_seen", []) + [(step, params, grads, updated)]
        return updated


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("variant", ["anil", "boil"])
def test_anil_and_boil_adapt_only_their_part_and_match_the_reference(variant, steps):
    """ANIL: only the head (the output layer of Sequential(Linear, Tanh, Linear)) takes inner steps;
    BOIL: only the body. The other part gets no inner gradient and keeps θ's value throughout."""
    upper_cls, lower_cls, reference, adapted, kept = {
        "anil": (ANILUpper, WatchedANIL, anil_reference, (2, 3), (0, 1)),
        "boil": (BOILUpper, WatchedBOIL, boil_reference, (0, 1), (2, 3)),
    }[variant]
    model = tanh_mlp()
    theta = [p.detach().clone() for p in model.parameters()]
    optimizer, lower, episodes = run(upper_cls, lower_cls, model, steps)
    assert lower.head == "2"
    assert [i for i, name in enumerate(lower.param_names) if lower.adapts(name)] == list(adapted)
    assert len(lower.steps_seen) == 2 * steps
    if variant == "boil":  # written with the step argument (WatchedANIL without: both kinds work)
        assert [seen[0] for seen in lower.steps_seen] == list(range(steps)) * 2
    for *_, params, grads, updated in lower.steps_seen:
        for i in kept:
            assert grads[i] is None and updated[i] is params[i] and torch.equal(updated[i], theta[i])
        for i in adapted:
            assert grads[i] is not None and not torch.equal(updated[i], params[i])
    assert_close(optimizer.seen_grads[0], reference(model, episodes, steps))


def test_boil_rejects_a_head_that_names_no_parameters_and_conv4s_body_is_its_features():
    with pytest.raises(ValueError, match=r"head='fc' names no parameters of Conv4"):
        BOILLower(Conv4(5, hidden=4, image_size=16), inner_lr=0.1, head="fc")
    lower = BOILLower(Conv4(5, hidden=4, image_size=16), inner_lr=0.1)
    assert all(n.startswith("features.") for n in lower.param_names if lower.adapts(n))


# -- a term added to the meta-objective: the Upper's training_step -------------------------------------
DECAY = 0.05


class PenaltyUpper(MAMLUpper):
    """MAML whose meta-objective adds DECAY·‖θ‖² to the query loss, logged as a statistic of its own."""

    def training_step(self, batch):
        out = super().training_step(batch)
        penalty = DECAY * sum((p ** 2).sum() for p in self.module.parameters())
        return {**out, "loss": out["loss"] + penalty, "penalty": penalty.detach()}


class TensorPenaltyUpper(MAMLUpper):
    """The same objective returned as a plain tensor, without statistics."""

    def training_step(self, batch):
        return super().training_step(batch)["loss"] + DECAY * sum((p ** 2).sum() for p in self.module.parameters())


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
@pytest.mark.parametrize("upper_cls", [PenaltyUpper, TensorPenaltyUpper], ids=["dict", "tensor"])
def test_a_term_added_in_the_uppers_training_step_reaches_the_meta_gradient(upper_cls, vectorize):
    """What the hook table says of ``MetaLearner.training_step``: its ``loss`` (or a plain tensor)
    is what θ's meta-gradient differentiates, and its other entries are logged. The penalty's own
    gradient, 2·DECAY·θ per task, is added to MAML's on the same tasks."""
    maml_optimizer, _, episodes = run(MAMLUpper, MAMLLower, tanh_mlp(), steps=2, vectorize=vectorize)
    model = tanh_mlp()
    optimizer, _, penalised_episodes = run(upper_cls, MAMLLower, model, steps=2, vectorize=vectorize)
    assert all(torch.equal(a, b) for task, other in zip(episodes, penalised_episodes)
               for a, b in zip(task[0] + task[1], other[0] + other[1]))
    expected = [g + 2 * DECAY * p for g, p in zip(maml_optimizer.seen_grads[0], model.parameters())]
    assert_close(optimizer.seen_grads[0], expected)


def test_a_statistic_of_the_uppers_training_step_is_logged_with_the_others():
    model = tanh_mlp()
    env = EpisodicEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1, seed=7)
    upper = PenaltyUpper(model, torch.optim.SGD(model.parameters(), lr=0.0), meta_batch_size=2)
    engine = MetaEngine(upper, MAMLLower(model, inner_lr=INNER_LR, inner_steps=1), env, meta_iterations=1)
    engine.train()
    stats = engine.meta_step()
    with torch.no_grad():
        penalty = DECAY * sum((p ** 2).sum() for p in model.parameters()).item()
    assert set(stats) == {"loss", "accuracy", "penalty", "lr"}
    assert stats["penalty"] == pytest.approx(penalty, rel=1e-12) and stats["loss"] > penalty


# -- a meta-gradient of the variant's own: MetaLearner.meta_gradient --------------------------------
BETA = 0.25


class MixedUpper(MAMLUpper):
    """β · MAML's meta-gradient + (1 − β) · FOMAML's, from one backward pass through the inner loop."""

    def meta_gradient(self, query_loss):
        theta, phi = self.trainable_parameters(), self.task_learner.params
        grads = torch.autograd.grad(query_loss, [*theta, *phi])
        second, first = grads[:len(theta)], self.reduce_over_tasks(grads[len(theta):])
        return tuple(BETA * s + (1 - BETA) * f for s, f in zip(second, first))


class UnreducedMixedUpper(MAMLUpper):
    """The same, with the φ-gradients left with their task axis (the slip the check names)."""

    def meta_gradient(self, query_loss):
        theta, phi = self.trainable_parameters(), self.task_learner.params
        grads = torch.autograd.grad(query_loss, [*theta, *phi])
        return tuple(BETA * s + (1 - BETA) * f for s, f in zip(grads[:len(theta)], grads[len(theta):]))


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_a_meta_gradient_of_the_variants_own_is_what_theta_receives(vectorize):
    """The recipe of the hook table: gradients with respect to φ, summed over the task axis by
    ``reduce_over_tasks``, mixed with MAML's; θ receives β·MAML + (1 − β)·FOMAML on the same tasks
    (both adapted one task at a time, where nothing has a task axis to reduce)."""
    maml, _, episodes = run(MAMLUpper, MAMLLower, tanh_mlp(), steps=2)
    fomaml, _, _ = run(FOMAMLUpper, FOMAMLLower, tanh_mlp(), steps=2)
    mixed, _, mixed_episodes = run(MixedUpper, MAMLLower, tanh_mlp(), steps=2, vectorize=vectorize)
    assert all(torch.equal(a, b) for task, other in zip(episodes, mixed_episodes)
               for a, b in zip(task[0] + task[1], other[0] + other[1]))
    expected = [BETA * s + (1 - BETA) * f for s, f in zip(maml.seen_grads[0], fomaml.seen_grads[0])]
    assert_close(mixed.seen_grads[0], expected)
    assert max((e - s).abs().max().item() for e, s in zip(expected, maml.seen_grads[0])) > 1e-4  # not MAML's


def test_a_meta_gradient_of_the_wrong_shape_or_count_is_named_before_theta_changes():
    class TooFewUpper(MetaSGDUpper):  # θ's gradients, forgetting Meta-SGD's step sizes
        def meta_gradient(self, query_loss):
            return super().meta_gradient(query_loss)[:len(self.initialization())]

    class PartialUpper(MAMLUpper):  # None: no gradient, so the outer step leaves that tensor
        def meta_gradient(self, query_loss):
            return (None, *super().meta_gradient(query_loss)[1:])

    model = tanh_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"^UnreducedMixedUpper\.meta_gradient returned a gradient of shape \(2, 16, 6\) "
                                         r"for '0\.weight' of shape \(16, 6\); differentiated with respect to φ, "
                                         r"gradients carry a task axis when tasks are adapted together: sum it with "
                                         r"self\.reduce_over_tasks\(\.\.\.\), as FOMAMLUpper does$"):
        run(UnreducedMixedUpper, MAMLLower, model, steps=1, lr=0.1, vectorize=True)
    with pytest.raises(ValueError, match=r"^TooFewUpper\.meta_gradient returned 4 gradients for 8 meta-learned tensors; "
                                         r"return one per entry of trainable_parameters\(\) \(θ's, then the task "
                                         r"learner's meta_parameters\(\)\), None where there is none$"):
        run(TooFewUpper, MetaSGDLower, model, steps=1, lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    run(PartialUpper, MAMLLower, model, steps=1, lr=0.1)
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), before)]
    assert changed == [False, True, True, True]


# -- CAVIA: a user's variant that starts the inner loop elsewhere (examples/cavia.py) ------------------
@pytest.fixture
def cavia(monkeypatch):
    """examples/cavia.py imported as a user's module; its registrations (the algorithm "cavia", its
    networks) are undone afterwards."""
    monkeypatch.setitem(ALGORITHMS, "cavia", None)  # the key is removed again when the test ends
    models = dict(REGISTERED_MODELS)
    spec = importlib.util.spec_from_file_location("cavia", EXAMPLES / "cavia.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert ALGORITHMS["cavia"] == (MAMLUpper, module.CAVIALower)
    yield module
    REGISTERED_MODELS.clear()
    REGISTERED_MODELS.update(models)


def cavia_reference(model, episodes, steps):
    """d/dθ of the mean query loss after k steps c ← c − lr ∇_c L_support(θ, c) from c = 0, written out here;
    θ's own context parameter takes no part, so its gradient is zero."""
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    network = theta[1:]  # theta[0] is the context parameter
    total = 0.0
    for (xs, ys), (xq, yq) in episodes:
        context = torch.zeros_like(theta[0], requires_grad=True)
        for _ in range(steps):
            grad, = torch.autograd.grad(F.cross_entropy(forward([context, *network], xs), ys), context,
                                        create_graph=True)
            context = context - INNER_LR * grad
        total = total + F.cross_entropy(forward([context, *network], xq), yq) / len(episodes)
    return [torch.zeros_like(theta[0]), *torch.autograd.grad(total, network)]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
def test_cavia_adapts_a_context_from_zero_and_gets_the_reference_gradient(cavia, vectorize, steps):
    torch.manual_seed(0)
    model = cavia.ContextMLP(6, 5, hidden=16, contexts=3, activation=nn.Tanh).double()
    optimizer, lower, episodes = run(MAMLUpper, cavia.CAVIALower, model, steps, vectorize=vectorize)
    assert len(episodes) == 2
    got = optimizer.seen_grads[0]
    assert_close(got, cavia_reference(model, episodes, steps), tol=1e-10)
    assert max(g.abs().max().item() for g in got[1:]) > 1e-4  # not trivially zero


def test_cavia_through_film_in_a_conv_net_gets_the_same_meta_gradient_vectorized_as_per_task(cavia):
    """examples/cavia.py's ContextConv4: each task's context scales and shifts the last block's input
    channels; adapted together, each task still gets its own context (and the gradient it gives)."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(64, 1, 16, 16, generator=generator, dtype=torch.float64)

    def images():
        labels = torch.randperm(64)[:5].repeat_interleave(2)
        return patterns[labels] + 0.5 * torch.randn(10, 1, 16, 16, dtype=torch.float64), labels

    grads = []
    for vectorize in (False, True):
        torch.manual_seed(0)
        model = cavia.ContextConv4(5, image_size=16, hidden=4, contexts=6).double()
        env = RecordingEnv(images, ways=5, shots=1, query_shots=1, seed=7)
        optimizer = RecordingSGD(model.parameters(), lr=0.0)
        MetaEngine(MAMLUpper(model, optimizer, meta_batch_size=3), cavia.CAVIALower(model, inner_lr=2.0, inner_steps=2),
                   env, meta_iterations=1, vectorize=vectorize).run()
        grads.append(optimizer.seen_grads[0])
    per_task, vectorized = grads
    assert_close(vectorized, per_task, tol=1e-10)
    names = [name for name, _ in model.named_parameters()]
    assert torch.equal(per_task[names.index("context")], torch.zeros(6))
    assert per_task[names.index("film.weight")].abs().max() > 1e-6  # the meta-gradient reaches FiLM through the context


def test_cavia_keeps_theta_context_at_zero_and_runs_without_host_reads(cavia):
    torch.manual_seed(0)
    model = cavia.ContextMLP(1, 1, hidden=16, contexts=2)
    engine = build_engine("cavia", model, SinusoidTasks(points=10), regression=True, shots=5, optimizer="sgd",
                          meta_batch_size=4, meta_iterations=3, meta_lr=0.1, valid_step=100)
    assert type(engine.task_learner) is cavia.CAVIALower
    engine.run()
    assert torch.equal(model.context, torch.zeros(2))
    assert first_host_read_in_capturable_region(engine, warm_up=False) is None


# -- Proto-MAML: a user's variant that starts from the support set (examples/protomaml.py) -----------
def forget_protomaml_algorithms_afterwards(monkeypatch):
    """The algorithms examples/protomaml.py registers are unregistered when the test ends."""
    for name in ("protomaml", "fo-protomaml"):
        monkeypatch.setitem(ALGORITHMS, name, None)


@pytest.fixture
def protomaml(monkeypatch):
    """examples/protomaml.py imported as a user's module; its algorithms are unregistered afterwards."""
    forget_protomaml_algorithms_afterwards(monkeypatch)
    spec = importlib.util.spec_from_file_location("protomaml", EXAMPLES / "protomaml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert ALGORITHMS["protomaml"] == (MAMLUpper, module.ProtoMAMLLower)
    assert ALGORITHMS["fo-protomaml"] == (MAMLUpper, module.FirstOrderProtoMAMLLower)
    return module


def prototypes_of(model, params, inputs, labels):
    body = nn.Sequential(*model[:-1])
    features = functional_call(body, dict(zip([n for n, _ in body.named_parameters()], params[:-2])), (inputs,))
    return torch.stack([features[labels == k].mean(0) for k in range(5)]), features


def protomaml_reference(model, episodes, steps):
    """d/dθ of the mean query loss after k SGD steps of every weight from the body of θ and the head
    (2c, −‖c‖²) of each task's support prototypes c, written out here; θ's own head takes no part."""
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0.0
    for (xs, ys), (xq, yq) in episodes:
        prototypes, _ = prototypes_of(model, theta, xs, ys)
        # the body's φ a node of its own: its inner gradient is the partial derivative, not also through the head
        phi = [*(t.clone() for t in theta[:-2]), 2 * prototypes, -(prototypes ** 2).sum(1)]
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi, create_graph=True)
            phi = [p - INNER_LR * g for p, g in zip(phi, grads)]
        total = total + F.cross_entropy(forward(phi, xq), yq) / len(episodes)
    return torch.autograd.grad(total, theta[:-2]) + (torch.zeros_like(theta[-2]), torch.zeros_like(theta[-1]))


def fo_protomaml_reference(model, episodes, steps):
    """fo-Proto-MAML's meta-gradient as Triantafillou et al. define it, written out here: φ_K from k SGD
    steps taken as constants (first order), ∇_φK L_query given to θ's body as FOMAML would, plus its
    head part carried back through the prototypes (the vector-Jacobian product of (2c, −‖c‖²) with the
    body); θ's own head receives zero."""
    forward = functional(model)
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    body = theta[:-2]
    total = [torch.zeros_like(t) for t in theta]
    for (xs, ys), (xq, yq) in episodes:
        prototypes, _ = prototypes_of(model, theta, xs, ys)
        head = (2 * prototypes, -(prototypes ** 2).sum(1))
        phi = [t.detach() for t in (*body, *head)]
        for _ in range(steps):
            phi = [p.requires_grad_() for p in phi]
            grads = torch.autograd.grad(F.cross_entropy(forward(phi, xs), ys), phi)
            phi = [(p - INNER_LR * g).detach() for p, g in zip(phi, grads)]
        phi = [p.requires_grad_() for p in phi]
        at_phi = torch.autograd.grad(F.cross_entropy(forward(phi, xq), yq) / len(episodes), phi)
        through_prototypes = torch.autograd.grad(head, body, grad_outputs=at_phi[-2:])
        for i, (direct, carried) in enumerate(zip(at_phi[:-2], through_prototypes)):
            total[i] += direct + carried
    return tuple(total)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
@pytest.mark.parametrize("lower", ["ProtoMAMLLower", "FirstOrderProtoMAMLLower"])
def test_protomaml_in_either_order_starts_its_head_from_support_prototypes_and_gets_the_reference_gradient(
        protomaml, lower, vectorize, steps):
    model = tanh_mlp()
    optimizer, _, episodes = run(MAMLUpper, getattr(protomaml, lower), model, steps, vectorize=vectorize)
    got = optimizer.seen_grads[0]
    second_order = protomaml_reference(model, episodes, steps)
    if lower == "ProtoMAMLLower":
        assert_close(got, second_order, tol=1e-10)
    else:
        assert_close(got, fo_protomaml_reference(model, episodes, steps), tol=1e-10)
        assert max((a - b).abs().max() for a, b in zip(got, second_order)) > 1e-4  # not Proto-MAML's gradient
    assert got[0].abs().max() > 1e-4  # the body's gradient, through the prototypes and the steps


@pytest.mark.parametrize("tasks", [None, 3], ids=["one task", "stacked"])
def test_protomaml_adapted_for_zero_steps_is_the_prototypical_network(protomaml, tasks):
    """Evaluation starts from the same hook: before any inner step, each query's scores are
    −‖x − c‖² + ‖x‖² for its class prototypes c (the nearest prototype wins)."""
    model = tanh_mlp()
    engine = MetaEngine(MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.0), meta_batch_size=1),
                        protomaml.ProtoMAMLLower(model, inner_lr=INNER_LR),
                        RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, query_shots=1))
    source = random_classification_source(5, 2, 6, seed=3)
    tasks_drawn = [source()[0] for _ in range(tasks or 1)]  # two examples of each of 5 classes
    support, query, labels = [x[0::2] for x in tasks_drawn], [x[1::2] for x in tasks_drawn], torch.arange(5)
    batch = (torch.stack(support), labels.expand(tasks, 5)) if tasks else (support[0], labels)
    starts = []
    engine.task_learner.adapt(batch, steps=1, tasks=tasks, after_step=lambda k, phi: starts.append(phi) if k == 0 else None)
    theta = list(model.parameters())
    for task, (xs, xq) in enumerate(zip(support, query)):
        scores = functional(model)([p[task] for p in starts[0]] if tasks else starts[0], xq)
        prototypes, _ = prototypes_of(model, theta, xs, labels)
        _, features = prototypes_of(model, theta, xq, labels)
        distances = torch.cdist(features, prototypes)
        assert torch.allclose(scores, -distances ** 2 + features.pow(2).sum(1, keepdim=True), atol=1e-10, rtol=0)
        assert torch.equal(scores.argmax(1), distances.argmin(1))


def test_a_start_of_the_wrong_shape_is_named_and_protomaml_refuses_what_it_cannot_start(protomaml):
    class DropsTheBias(protomaml.ProtoMAMLLower):
        def start_for_task(self, params, batch):
            return super().start_for_task(params, batch)[:-1]

    for vectorize in (False, True):
        with pytest.raises(ValueError, match=r"^DropsTheBias\.start_for_task\(\) returned 3 tensors of shapes "
                                             r"\(16, 6\), \(16,\), \(5, 16\); it "
                                             r"must return one per parameter, of its shape: 0\.weight \(16, 6\), "
                                             r"0\.bias \(16,\), 2\.weight \(5, 16\), 2\.bias \(5,\)$"):
            run(MAMLUpper, DropsTheBias, tanh_mlp(), 1, vectorize=vectorize)
    with pytest.raises(ValueError, match=r"^Proto-MAML sets a linear output layer from prototypes; Sequential's last "
                                         r"layer '1' is a Conv1d \(with a bias needed\)$"):
        protomaml.ProtoMAMLLower(nn.Sequential(nn.Flatten(), nn.Conv1d(1, 5, 3)), inner_lr=0.1)
    with pytest.raises(ValueError, match=r"^Proto-MAML classifies: its tasks' labels must be class indices"):
        build_engine("protomaml", nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 1)),
                     SinusoidTasks(points=10), regression=True, shots=5, meta_iterations=1).run()


@pytest.mark.parametrize("lower", ["ProtoMAMLLower", "FirstOrderProtoMAMLLower"])
def test_protomaml_runs_without_host_reads(protomaml, lower):
    """What a CUDA graph capture needs of the hook (tasks drawn on the device, as the built-in datasets are)."""
    torch.manual_seed(0)
    model = Conv4(5, hidden=4, image_size=16)
    labels = torch.arange(12).repeat_interleave(4)
    sampler = DeviceTaskSampler(torch.randn(48, 1, 16, 16) + labels.view(-1, 1, 1, 1) / 4,
                                [range(c * 4, c * 4 + 4) for c in range(12)], ways=5, shots=1, query_shots=2)
    engine = MetaEngine(MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=4),
                        getattr(protomaml, lower)(model, inner_lr=0.1, inner_steps=2),
                        EpisodicEnv(sampler, ways=5, shots=1, query_shots=2, seed=3), meta_iterations=1)
    assert engine.vectorized
    assert first_host_read_in_capturable_region(engine) is None


@pytest.fixture
def protomaml_plugin(tmp_path, monkeypatch):
    """examples/protomaml.py in the folder the command runs in, as a user's plugin; imported once, forgotten after."""
    shutil.copy(EXAMPLES / "protomaml.py", tmp_path / "protomaml.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    forget_protomaml_algorithms_afterwards(monkeypatch)
    yield
    sys.modules.pop("protomaml", None)


def test_protomaml_from_the_cli_classifies_by_prototypes_before_its_first_inner_step(protomaml_plugin, omniglot_root):
    """`evaluate` adapts held-out tasks from the same start as training: before the inner step the
    learner is already the prototypical network of the support set, far above chance (MAML's θ head is not)."""
    from bilevel_maml import cli

    cli.run(["train", "--plugin", "protomaml", "--algorithm", "protomaml", "--data-root", str(omniglot_root),
             "--width", "8", "--iterations", "2", "--meta-batch-size", "2", "--valid-tasks", "5", "--test-tasks", "5",
             "--wandb", "disabled", "--output", "proto"])
    report = cli.run(["evaluate", "--output", "proto", "--per-step", "--test-tasks", "200"])
    accuracy = report["per_step"]["accuracy"]
    assert len(accuracy) == 2 and accuracy[-1] == pytest.approx(report["accuracy"])
    assert accuracy[0] > 0.2 + 0.08  # 5 ways: chance is 0.2 (± 0.025 over 1,000 queries); measured 0.331


# -- through the builder, vectorized, checkpointed ------------------------------------------------
@pytest.mark.parametrize("algorithm", ["metasgd", "anil", "maml++", "reptile", "boil"])
def test_variants_are_registered_and_run_vectorized_from_build_engine(algorithm):
    assert algorithm in ALGORITHMS
    torch.manual_seed(0)
    engine = build_engine(algorithm, nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)),
                          random_classification_source(5, 3, 6, dtype=torch.float32), ways=5, shots=1,
                          meta_batch_size=4, meta_iterations=3, valid_step=100)
    assert engine.vectorized
    engine.run()
    state = engine.state_dict()
    assert len(state["task_learner_meta_parameters"]) == (4 if algorithm in ("metasgd", "maml++") else 0)


def test_meta_sgd_from_the_cli_checkpoints_and_evaluates_with_its_learned_rates(tmp_path):
    from bilevel_maml import cli

    output = tmp_path / "metasgd"
    result = cli.run(["train", "--algorithm", "metasgd", "--dataset", "sinusoid", "--dtype", "float64",
                      "--width", "16", "--iterations", "6", "--meta-batch-size", "4", "--valid-every", "3",
                      "--valid-tasks", "5", "--test-tasks", "20", "--wandb", "disabled", "--output", str(output)])
    best = torch.load(output / "checkpoints" / "best.pt", weights_only=False)["engine"]
    rates = best["task_learner_meta_parameters"]
    assert len(rates) == 6 and not all(torch.allclose(r, torch.full_like(r, 0.1)) for r in rates)
    evaluated = cli.run(["evaluate", "--output", str(output), "--test-tasks", "20"])
    assert evaluated["loss"] == pytest.approx(result["loss"], abs=1e-12)


class LogitsAndFeatures(nn.Module):
    """A user's model that returns extras after its prediction."""

    def __init__(self, logits_only=False):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.logits_only = nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Linear(16, 5), logits_only

    def forward(self, x):
        features = self.body(x)
        return self.head(features) if self.logits_only else (self.head(features), features)


def feature_penalised(outputs, labels):
    logits, features = outputs
    return F.cross_entropy(logits, labels) + 0.5 * features.pow(2).mean()


@pytest.mark.parametrize("algorithm", ["maml", "imaml", "anil"])
def test_a_model_returning_extras_is_scored_on_its_first_output_and_its_loss_sees_them_all(algorithm):
    def trained(model, loss_fn=None, vectorize=True):
        model = model.double()
        engine = build_engine(algorithm, model, random_classification_source(5, 3, 6), ways=5, shots=1,
                              meta_batch_size=4, meta_iterations=2, meta_lr=0.1, loss_fn=loss_fn,
                              vectorize=vectorize, seed=1,
                              algorithm_options={"head": "head"} if algorithm == "anil" else None)
        history = engine.run()
        report = engine.evaluate(engine.test_env, 6, per_task=True)
        return [p.detach() for p in model.parameters()], history, report

    plain_theta, plain_history, plain_report = trained(LogitsAndFeatures(logits_only=True))
    for vectorize in (True, False):  # the default loss: as if the model returned its logits alone
        theta, history, report = trained(LogitsAndFeatures(), vectorize=vectorize)
        assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(theta, plain_theta))
        assert [h["accuracy"] for h in history] == pytest.approx([h["accuracy"] for h in plain_history])
        assert report["per_task"]["accuracy"] == pytest.approx(plain_report["per_task"]["accuracy"], abs=1e-10)
    penalised = [trained(LogitsAndFeatures(), feature_penalised, vectorize) for vectorize in (True, False)]
    (theta, history, report), (per_task_theta, _, per_task_report) = penalised
    assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(theta, per_task_theta))
    assert not torch.allclose(theta[0], plain_theta[0], atol=1e-4)  # the features' term moved θ
    assert report["per_task"]["loss"] == pytest.approx(per_task_report["per_task"]["loss"], abs=1e-10)
    assert "accuracy" in history[-1] and "accuracy" in report
