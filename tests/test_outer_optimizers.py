"""Any torch.optim optimizer can drive θ: the update equals that optimizer applied to the
reference meta-gradient."""

import copy
import math

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



def test_a_run_with_an_lr_scheduler_resumed_from_its_state_ends_as_if_never_stopped():
    """The scheduler's state travels in the engine's state (checkpoints): resumed after 3 of 6
    iterations, the rates and θ are those of the run that never stopped."""
    def engine(iterations):
        torch.manual_seed(0)
        return build_engine("maml", nn.Linear(6, 5).double(), random_classification_source(5, 4, 6), ways=5,
                            shots=1, meta_iterations=iterations, meta_batch_size=2, meta_lr=0.1,
                            scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))

    straight = engine(6)
    straight.run()
    stopped = engine(3)
    stopped.run()
    resumed = engine(6)
    resumed.load_state_dict(copy.deepcopy(stopped.state_dict()))
    history = resumed.run()
    assert [h["lr"] for h in history] == [h["lr"] for h in straight.history] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    for got, want in zip(resumed.meta_learner.module.parameters(), straight.meta_learner.module.parameters()):
        assert torch.equal(got, want)
    assert resumed.meta_learner.lr_scheduler.state_dict() == straight.meta_learner.lr_scheduler.state_dict()

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


class RecordingRates(torch.optim.SGD):
    """SGD that records every param group's rate at each outer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used = []

    def step(self, closure=None):
        self.used.append([float(group["lr"]) for group in self.param_groups])
        return super().step(closure)


def cosine(initial, minimum, iteration, total):
    return minimum + 0.5 * (initial - minimum) * (1 + math.cos(math.pi * (iteration - 1) / total))


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_a_cosine_schedule_sets_every_groups_rate_and_an_extended_run_re_spans_it(algorithm):
    """meta_lr_schedule="cosine" for any algorithm: each outer step's rate is the closed form at that
    iteration (Meta-SGD's step sizes' group too, from its own start); an engine loaded from the
    checkpoint with more iterations continues over the new total from the initial rate it saved."""
    def built(iterations):
        return build_engine(algorithm, nn.Linear(6, 5), random_classification_source(5, 2, 6, dtype=torch.float32),
                            ways=5, shots=1, meta_batch_size=2, meta_iterations=iterations, meta_lr=0.1,
                            optimizer=RecordingRates, meta_lr_schedule="cosine", min_meta_lr=0.01, seed=4)

    engine = built(4)
    history = engine.run()
    groups = len(engine.meta_learner.optimizer.param_groups)
    assert groups == (2 if algorithm == "metasgd" else 1)
    expected = [[cosine(0.1, 0.01, i, 4)] * groups for i in (1, 2, 3, 4)]
    assert sum(engine.meta_learner.optimizer.used, []) == pytest.approx(sum(expected, []), rel=1e-12)
    assert [h["lr"] for h in history] == pytest.approx([rates[0] for rates in expected], rel=1e-12)

    extended = built(6)
    extended.load_state_dict(engine.state_dict())
    extended.run()
    assert sum(extended.meta_learner.optimizer.used, []) == pytest.approx(
        [cosine(0.1, 0.01, i, 6) for i in (5, 6) for _ in range(groups)], rel=1e-12)


def test_the_outer_learning_rate_schedule_is_checked_before_any_work():
    model = nn.Linear(6, 5)
    source = random_classification_source(5, 2, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="^unknown meta_lr_schedule 'linear'; choose one of: constant, cosine$"):
        build_engine("maml", model, source, ways=5, meta_lr_schedule="linear")
    with pytest.raises(ValueError, match="^min_meta_lr must be a finite number >= 0, got -0.1$"):
        build_engine("maml", model, source, ways=5, meta_lr_schedule="cosine", min_meta_lr=-0.1)
    with pytest.raises(ValueError, match="min_meta_lr=0.1 is where a cosine schedule ends, and meta_lr_schedule is "
                                         "'constant'; pass meta_lr_schedule='cosine' too"):
        build_engine("maml", model, source, ways=5, min_meta_lr=0.1)
    with pytest.raises(ValueError, match="meta_lr_schedule='cosine' and a scheduler both set the outer learning rate"):
        build_engine("maml", model, source, ways=5, meta_lr_schedule="cosine",
                     scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    with pytest.raises(ValueError, match="cosine_lr=False and meta_lr_schedule='cosine' disagree"):
        build_engine("maml++", model, source, ways=5, meta_lr_schedule="cosine",
                     algorithm_options={"cosine_lr": False})
    # the class itself, spelled in capitals (build_engine lower-cases it before)
    upper = ALGORITHMS["maml++"][0]
    with pytest.raises(ValueError, match="cosine_lr=False and meta_lr_schedule='cosine' disagree"):
        upper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_lr_schedule="Cosine", cosine_lr=False)
    spelled = upper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_lr_schedule="COSINE")
    assert (spelled.meta_lr_schedule, spelled.min_meta_lr, spelled.cosine_lr) == ("cosine", 1e-5, True)
    # MAML++'s own cosine is this schedule; "constant" turns it off
    assert build_engine("maml++", model, source, ways=5).meta_learner.meta_lr_schedule == "cosine"
    assert build_engine("maml++", model, source, ways=5,
                        meta_lr_schedule="constant").meta_learner.meta_lr_schedule == "constant"
