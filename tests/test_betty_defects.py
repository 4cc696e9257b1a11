"""Each Betty 0.1.1 defect on our code path: the unpatched behaviour fails, ours passes.

Each test first shows the defect in Betty itself (so that when Betty fixes it, the test says our
override can go), then checks our replacement.
"""

import glob

import betty.hypergradient as betty_hypergradient
import pytest
import torch
from betty.configs import Config
from betty.engine import Engine as BettyEngine
from betty.envs import Env as BettyEnv

from bilevel_maml import hypergradient, MAMLLower, MAMLUpper, MetaEngine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.logging import WandbLogger, read_offline_run

from conftest import random_classification_source

N = 6


class QuadraticLower:
    """A stand-in Lower problem with inner loss ½ φᵀAφ − φᵀBθ (+ an unused parameter)."""

    def __init__(self, config, theta, unused_param=False):
        torch.manual_seed(0)
        q = torch.linalg.qr(torch.randn(N, N, dtype=torch.float64))[0]
        self.A = q @ torch.diag(torch.linspace(0.5, 20.0, N, dtype=torch.float64)) @ q.T
        self.B = torch.randn(N, N, dtype=torch.float64)
        self.phi = torch.randn(N, dtype=torch.float64, requires_grad=True)
        self.extra = [torch.zeros(3, dtype=torch.float64, requires_grad=True)] if unused_param else []
        self.theta = theta
        self.config, self.paths, self.cur_batch, self.name = config, [], None, "lower"

    def trainable_parameters(self):
        return [self.phi, *self.extra]

    parameters = trainable_parameters

    def training_step_exec(self, batch):
        return 0.5 * self.phi @ self.A @ self.phi - self.phi @ self.B @ self.theta.params[0]


class Theta:
    def __init__(self):
        self.params = [torch.randn(N, dtype=torch.float64, requires_grad=True)]
        self.config, self.name = Config(), "upper"

    def trainable_parameters(self):
        return self.params


def test_darts_rollback_restores_parameters_exactly():
    upper = Theta()
    lower = QuadraticLower(Config(type="darts", darts_alpha=0.01), upper)
    vector = [torch.randn(N, dtype=torch.float64)]
    before = lower.phi.detach().clone()

    betty_hypergradient.darts(vector, lower, upper)
    assert not torch.allclose(lower.phi.detach(), before), "Betty's darts now restores φ; drop our override"

    lower.phi.data.copy_(before)
    result = hypergradient.darts(vector, lower, upper)
    assert torch.equal(lower.phi.detach(), before)
    # For a quadratic the finite difference is exact: -d²L/dθdφ · v = Bᵀv.
    assert torch.allclose(result[0], lower.B.T @ vector[0], atol=1e-8)


def test_cg_converges_to_the_implicit_gradient():
    upper = Theta()
    lower = QuadraticLower(Config(type="cg", cg_iterations=N), upper)
    vector = [torch.randn(N, dtype=torch.float64)]
    exact = lower.B.T @ torch.linalg.solve(lower.A, vector[0])  # -d²L/dθdφ · A⁻¹ v

    betty_result = betty_hypergradient.cg(vector, lower, upper)
    assert (betty_result[0] - exact).abs().max() > 1e-3, "Betty's CG now converges; drop our override"

    ours = hypergradient.cg(vector, lower, upper)
    assert torch.allclose(ours[0], exact, atol=1e-8)


def test_conjugate_gradient_solves_an_spd_system_in_n_iterations():
    torch.manual_seed(1)
    m = torch.randn(N, N, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(N, dtype=torch.float64)
    b = torch.randn(N, dtype=torch.float64)
    (x,) = hypergradient.conjugate_gradient(lambda v: (a @ v[0],), (b,), iterations=N)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)


def test_get_grads_allows_lower_parameters_the_upper_loss_does_not_use():
    upper = Theta()
    lower = QuadraticLower(Config(type="cg", cg_iterations=N), upper, unused_param=True)
    upper_loss = (lower.phi**2).sum()  # does not touch lower.extra
    path = [upper, lower, upper]

    with pytest.raises(RuntimeError, match="not have been used"):
        betty_hypergradient.get_grads(upper_loss, path, retain_graph=True)

    grads = hypergradient.get_grads(upper_loss, path, retain_graph=True)
    assert grads[0].shape == upper.params[0].shape and torch.isfinite(grads[0]).all()


def test_wandb_logger_starts_a_run_and_the_run_folder_holds_the_logged_values(tmp_path, monkeypatch):
    import wandb
    from betty.logging.logger_wandb import WandBLogger as BettyWandBLogger

    monkeypatch.chdir(tmp_path)
    BettyWandBLogger()
    assert wandb.run is None, "Betty's WandBLogger now starts a run; drop our override"

    logger = WandbLogger(project="defects", name="pin", config={"ways": 5}, mode="offline", dir=str(tmp_path))
    assert wandb.run is not None
    logger.log({"loss": 1.25, "accuracy": torch.tensor(0.5)}, tag="train", step=1)
    logger.finish()
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    run = read_offline_run(run_dir)
    assert run["config"]["ways"] == 5
    assert run["history"][0]["train/loss"] == 1.25 and run["history"][0]["train/accuracy"] == 0.5


def other_device():
    return "cuda" if torch.cuda.is_available() else "meta"


def test_env_has_a_device_and_moves_each_task_there():
    assert not hasattr(BettyEnv(), "device"), "Betty's Env now has a device; drop our override"
    env = EpisodicEnv(random_classification_source(5, 2, 3), ways=5, shots=1, device=other_device())
    env.step()
    for inputs, labels in env.batch.values():
        assert inputs.device.type == other_device() and labels.device.type == other_device()


def test_engine_has_a_device_and_puts_problems_and_envs_on_it():
    assert "device" not in BettyEngine.__init__.__code__.co_varnames, "Betty's Engine now takes a device"
    model = torch.nn.Linear(3, 5)
    env = EpisodicEnv(random_classification_source(5, 2, 3, dtype=torch.float32), ways=5, shots=1)
    upper = MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1))
    lower = MAMLLower(model, inner_lr=0.1)
    engine = MetaEngine(upper, lower, env, device=other_device())
    assert engine.device.type == other_device() and env.device.type == other_device()
    assert all(p.device.type == other_device() for p in model.parameters())


def test_get_loss_keeps_the_loss_on_the_device():
    """Betty's Problem.get_loss calls loss.item() at every step of every problem: a host
    synchronisation per inner step, and an error inside CUDA-graph capture. Ours returns the same
    scaled loss and keeps the statistic a tensor."""
    from betty.problems import Problem

    from bilevel_maml.execution import HostReadWatch

    model = torch.nn.Linear(3, 5)
    env = EpisodicEnv(random_classification_source(5, 2, 3, dtype=torch.float32), ways=5, shots=1)
    upper = MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=2)
    lower = MAMLLower(model, inner_lr=0.1)
    MetaEngine(upper, lower, env, vectorize=False).train()
    env.step()
    lower.on_inner_loop_start()
    batch = lower.get_batch()

    watch = HostReadWatch()
    with watch:
        betty_loss, betty_stats = Problem.get_loss(lower, batch)
    assert watch.first is not None and "(item)" in watch.first, "Betty's get_loss no longer reads the loss; drop ours"
    assert isinstance(betty_stats["loss"], float)

    watch = HostReadWatch()
    with watch:
        loss, stats = lower.get_loss(batch)
        upper_loss, upper_stats = upper.get_loss(upper.get_batch())
    assert watch.first is None, watch.first
    assert torch.equal(loss, betty_loss) and stats["loss"].item() == betty_stats["loss"]
    assert isinstance(upper_stats["loss"], torch.Tensor) and upper_loss.requires_grad
