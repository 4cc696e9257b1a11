"""Any torch.optim optimizer can drive θ: the update equals that optimizer applied to the
reference meta-gradient."""

import copy

import pytest
import torch
from torch import nn

from bilevel_maml import ALGORITHMS, MAMLLower, MAMLUpper, MetaEngine, build_engine
from bilevel_maml.builder import OPTIMIZERS

from conftest import RecordingEnv, RecordingSGD, random_classification_source
from test_meta_gradients import INNER_LR, unrolled_maml_gradient


@pytest.mark.parametrize("name", ["adam", "adamw", "adafactor", "sgd"])
def test_outer_step_is_the_optimizer_applied_to_the_meta_gradient(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    reference_model = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    env = RecordingEnv(random_classification_source(5, 2, 6), ways=5, shots=1, seed=5)
    optimizer = OPTIMIZERS[name](model.parameters(), lr=0.05)
    upper = MAMLUpper(model, optimizer, meta_batch_size=2)
    lower = MAMLLower(model, inner_lr=INNER_LR, inner_steps=2)
    MetaEngine(upper, lower, env, meta_iterations=1).run()

    per_task = [unrolled_maml_gradient(reference_model, e, 2, create_graph=True) for e in env.episodes]
    reference_optimizer = OPTIMIZERS[name](reference_model.parameters(), lr=0.05)
    for p, a, b in zip(reference_model.parameters(), *per_task):
        p.grad = (a + b) / 2
    reference_optimizer.step()
    for got, expected in zip(model.parameters(), reference_model.parameters()):
        assert torch.allclose(got, expected, atol=1e-10)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), initial))


def test_build_engine_accepts_an_optimizer_factory_and_a_scheduler():
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    source = random_classification_source(5, 2, 6, dtype=torch.float32)
    used = []

    class RecordingMomentumSGD(torch.optim.SGD):
        def step(self, closure=None):
            used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    engine = build_engine(
        "fomaml", model, source, ways=5, shots=1, meta_iterations=4, meta_batch_size=2, meta_lr=0.1,
        optimizer=lambda params, lr: RecordingMomentumSGD(params, lr=lr, momentum=0.9),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    )
    history = engine.run()
    # each iteration logs the rate its outer step used (not the one the scheduler set for the next)
    assert [round(h["lr"], 6) for h in history] == used == [0.1, 0.1, 0.05, 0.05]
    assert engine.meta_learner.optimizer.param_groups[0]["momentum"] == 0.9


def test_gradient_clipping_scales_the_whole_meta_gradient_to_the_norm():
    """θ's gradient and Meta-SGD's step sizes' are scaled together, by max_norm / their joint norm."""
    def seen_gradient(clipping):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
        engine = build_engine("metasgd", model, random_classification_source(5, 2, 6), ways=5, shots=1,
                              meta_batch_size=2, meta_iterations=1, optimizer=RecordingSGD,
                              gradient_clipping=clipping, seed=3)
        engine.run()
        grads = engine.meta_learner.optimizer.seen_grads[0]
        assert len(grads) == 8  # four of θ, four step sizes
        return grads

    unclipped = seen_gradient(0.0)
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in unclipped]))
    for got, want in zip(seen_gradient(0.25 * norm.item()), unclipped):
        assert torch.allclose(got, 0.25 * want, atol=1e-6 * norm.item(), rtol=1e-5)
    for got, want in zip(seen_gradient(2 * norm.item()), unclipped):  # within the norm: unchanged
        assert torch.equal(got, want)


def test_a_schedule_reaches_meta_sgds_step_sizes_too():
    """build_engine adds the learned step sizes to the optimizer before the scheduler is built (a torch
    scheduler covers the param groups it was built with; the step failed on the group added later)."""
    used = []

    class RecordingRates(torch.optim.SGD):
        def step(self, closure=None):
            used.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    engine = build_engine("metasgd", nn.Linear(6, 5), random_classification_source(5, 2, 6, dtype=torch.float32),
                          ways=5, shots=1, meta_batch_size=2, meta_iterations=3, meta_lr=0.1, optimizer=RecordingRates,
                          scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    engine.run()
    assert used == [[0.1, 0.1], [0.05, 0.05], [0.025, 0.025]]  # θ's group, then the step sizes'

    model = nn.Linear(6, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    upper = ALGORITHMS["metasgd"][0](model, optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1))
    lower = ALGORITHMS["metasgd"][1](model, inner_lr=0.1)
    env = RecordingEnv(random_classification_source(5, 2, 6, dtype=torch.float32), ways=5, shots=1, seed=5)
    with pytest.raises(ValueError, match=r"MetaSGDLower.meta_parameters\(\) are not in the outer optimizer, and its "
                                         r"LR scheduler was built without them: add them first"):
        MetaEngine(upper, lower, env)
