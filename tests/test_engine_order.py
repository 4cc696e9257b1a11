"""The engine's order of operations, observed through counting hooks."""

import pytest
import torch
from torch import nn

from bilevel_maml import FOMAMLLower, FOMAMLUpper, MAMLLower, MAMLUpper, MetaEngine
from bilevel_maml.env import EpisodicEnv

from conftest import random_classification_source

EVENTS: list = []


class CountingEnv(EpisodicEnv):
    def step(self):
        EVENTS.append("env")
        super().step()


def counting(upper_cls, lower_cls):
    class Lower(lower_cls):
        def on_inner_loop_start(self):
            super().on_inner_loop_start()
            theta = self.meta_learner.trainable_parameters()
            tasks = self.params[0].shape[0] if self.tasks_in_batch else None
            starts_at_theta = all(
                torch.equal(p, t) if tasks is None else all(torch.equal(p[i], t) for i in range(tasks))
                for p, t in zip(self.params, theta)
            )
            # MAML's φ must be θ itself (or, vectorized, a view of it) so the graph reaches θ.
            is_theta = all(p is t or p._base is t for p, t in zip(self.params, theta))
            EVENTS.append(("start", starts_at_theta, is_theta))

        def training_step(self, batch):
            EVENTS.append("inner")
            return super().training_step(batch)

    class Upper(upper_cls):
        def training_step(self, batch):
            EVENTS.append("query")
            return super().training_step(batch)

        def optimizer_step(self, *args, **kwargs):
            EVENTS.append("update")
            return super().optimizer_step(*args, **kwargs)

    return Upper, Lower


class CountingEngine(MetaEngine):
    def validation(self):
        EVENTS.append(("validation", self.meta_iteration))
        return super().validation()


@pytest.mark.parametrize("vectorize", [False, True], ids=["per-task", "vectorized"])
@pytest.mark.parametrize("algorithm", [(MAMLUpper, MAMLLower), (FOMAMLUpper, FOMAMLLower)], ids=["maml", "fomaml"])
def test_env_step_once_per_task_upper_once_per_meta_batch_validation_on_schedule(algorithm, vectorize):
    EVENTS.clear()
    upper_cls, lower_cls = counting(*algorithm)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    source = random_classification_source(3, 2, 4, dtype=torch.float32)
    env = CountingEnv(source, ways=3, shots=1, seed=1)
    valid_env = EpisodicEnv(source, ways=3, shots=1, seed=2)
    upper = upper_cls(model, torch.optim.SGD(model.parameters(), lr=0.5), meta_batch_size=4)
    lower = lower_cls(model, inner_lr=0.1, inner_steps=3)
    engine = CountingEngine(upper, lower, env, meta_iterations=6, valid_env=valid_env, valid_step=2, valid_tasks=5,
                            vectorize=vectorize)
    assert engine.vectorized == vectorize
    engine.run()

    # Vectorized, one env step draws the whole meta-batch and each problem steps for all of it.
    one_task = ["env", "start", "inner", "inner", "inner", "query"]
    tasks_per_env_step = 4 if vectorize else 1
    validations = [e for e in EVENTS if isinstance(e, tuple) and e[0] == "validation"]
    assert validations == [("validation", 2), ("validation", 4), ("validation", 6)]
    training = [e[0] if isinstance(e, tuple) and e[0] == "start" else e for e in EVENTS if e not in validations]
    assert training == (one_task * (4 // tasks_per_env_step) + ["update"]) * 6
    assert env.tasks_sampled == 24 and valid_env.tasks_sampled == 0  # validation draws, does not step

    starts = [e for e in EVENTS if isinstance(e, tuple) and e[0] == "start"]
    assert all(equal for _, equal, _ in starts), "every inner loop starts from the current θ"
    assert all(same for _, _, same in starts) == (algorithm[0] is MAMLUpper)  # MAML: θ itself


def test_theta_changes_only_at_meta_updates():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    source = random_classification_source(3, 2, 4, dtype=torch.float32)
    upper = MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.5), meta_batch_size=3)
    lower = MAMLLower(model, inner_lr=0.1, inner_steps=2)
    engine = MetaEngine(upper, lower, EpisodicEnv(source, ways=3, shots=1), meta_iterations=1, vectorize=False)
    engine.train()
    snapshots = []
    for _ in range(3 * 2):
        snapshots.append(model.weight.detach().clone())
        engine.global_step += 1
        engine.train_step()
    assert all(torch.equal(s, snapshots[0]) for s in snapshots)
    assert not torch.equal(model.weight, snapshots[0])


@pytest.mark.parametrize("key, results, best", [
    ("accuracy", [0.50, 0.70, 0.60, 0.70], (2, 0.70)),  # higher accuracy is better; a tie is no improvement
    ("loss", [2.0, 1.0, 1.5, 1.0], (2, 1.0)),            # regression: lower loss is better
])
def test_the_best_validation_is_the_highest_accuracy_or_else_the_lowest_loss(key, results, best):
    from types import SimpleNamespace


    seen = []
    fake = SimpleNamespace(rank=0, best_valid=None, meta_iteration=0,
                           _call=lambda hook, stats, improved: seen.append(improved))
    for iteration, value in enumerate(results, start=1):
        stats = {"loss": 9.0, key: value} if key == "accuracy" else {"loss": value}
        fake.meta_iteration, fake.validation = iteration, (lambda stats=stats: stats)
        MetaEngine.validate(fake)
    assert (fake.best_valid["iteration"], fake.best_valid[key]) == best
    assert seen == [True, True, False, False]
