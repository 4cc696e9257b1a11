"""Bad arguments fail before any training, with a message naming the value and what is allowed."""

import pytest
import torch

from bilevel_maml import IMAMLLower, MAMLLower, MAMLUpper, MetaEngine, build_engine
from bilevel_maml.data import CharacterImages, DataNotFoundError, omniglot_small_tasksets, task_dataset
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.models import MLP


def small_tasksets(ways=5, samples_per_class=4):
    """A learn2learn TaskDataset over 6 classes with 4 examples each."""
    characters = [torch.rand(4, 1, 8, 8) for _ in range(6)]
    tasks = task_dataset(CharacterImages(characters), ways=min(ways, 6), samples_per_class=min(samples_per_class, 4))
    return {"train": tasks, "validation": tasks, "test": tasks}


def flat_model():
    return torch.nn.Sequential(torch.nn.Flatten(), MLP(64, 5))


def build(**overrides):
    arguments = dict(algorithm="maml", model=flat_model(), tasksets=small_tasksets(), ways=5, shots=1,
                     query_shots=1, inner_steps=1, meta_batch_size=2, meta_iterations=1)
    arguments.update(overrides)
    return build_engine(**arguments)


def test_a_valid_configuration_builds():
    engine = build()
    assert engine.meta_batch_size == 2


def test_maml_plus_plus_ends_its_cosine_at_a_rate_that_starts_below_its_default_end():
    """MAML++ anneals toward 1e-5 by default; a run whose outer rate starts below that stays at it."""
    assert build(algorithm="maml++", meta_lr=1e-6).meta_learner.min_meta_lr == 1e-6
    assert build(algorithm="maml++", meta_lr=1e-3).meta_learner.min_meta_lr == 1e-5


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(ways=7), ValueError, r"the train split: ways=7 is more than its 6 classes; choose ways <= 6"),
        (dict(shots=3, query_shots=2), ValueError, r"the train split: shots \+ query_shots = 3 \+ 2 = 5 is more than "
                                                   r"the 4 examples"),
        (dict(ways=1), ValueError, r"^ways=1: a task of one class is solved before any learning \(every answer is its "
                                   r"class, the loss 0\); choose ways >= 2$"),
        (dict(meta_lr=1e-3, meta_lr_schedule="cosine", min_meta_lr=0.01), ValueError,
         r"^min_meta_lr=0.01 is above the outer learning rate 0.001 the cosine schedule starts from, and it anneals "
         r"down to min_meta_lr; choose min_meta_lr <= 0.001$"),
        (dict(algorithm="maml++", meta_lr=1e-3, min_meta_lr=0.002), ValueError, r"^min_meta_lr=0.002 is above"),
        (dict(inner_steps=0), ValueError, r"inner_steps must be an integer >= 1, got 0"),
        (dict(inner_steps=1.5), TypeError, r"inner_steps must be an integer >= 1, got 1.5"),
        (dict(eval_inner_steps=0), ValueError, r"eval_inner_steps must be an integer >= 1, got 0"),
        (dict(gradient_clipping=-1.0), ValueError, r"gradient_clipping \(a norm; 0 turns clipping off\) must be a "
                                                   r"positive finite number, got -1.0"),
        (dict(gradient_clipping=float("nan")), ValueError, r"gradient_clipping .* got nan"),
        (dict(meta_batch_size=0), ValueError, r"meta_batch_size must be an integer >= 1, got 0"),
        (dict(algorithm="reptil"), ValueError, r"unknown algorithm 'reptil'; known: anil, boil, fomaml, imaml, maml, maml\+\+, "
                                              r"metasgd, reptile\. A variant of your own is registered with"),
        (dict(inner_lr=0.0), ValueError, r"inner_lr must be a positive finite number, got 0.0"),
        (dict(meta_lr=-1e-3), ValueError, r"meta_lr must be a positive finite number, got -0.001"),
        (dict(algorithm="imaml", lam=0), ValueError, r"lam \(the iMAML proximal strength λ\) must be a positive"),
        (dict(optimizer="rmsprop"), ValueError, r"unknown optimizer 'rmsprop'; choose one of: adafactor, adam, adamw, sgd"),
        (dict(model="conv4"), TypeError, r"model must be a torch.nn.Module, got str"),
        (dict(dtype=torch.int64), TypeError, r"^dtype must be a floating-point torch.dtype \(torch.float32, "
                                             r"torch.float64, \.\.\.\), got torch.int64$"),
        (dict(dtype="float64"), TypeError, r"^dtype must be a floating-point torch.dtype .*, got 'float64'$"),
        (dict(vectorize="yes"), TypeError, r"^vectorize must be True, False or the tasks adapted per call \(an "
                                           r"integer >= 1\), got 'yes'$"),
        (dict(vectorize=-2), ValueError, r"^vectorize must be True, False .*, got -2$"),
        (dict(device="gpu"), ValueError, r"device must be cpu, cuda or cuda:N, got 'gpu'"),
        *([(dict(device="cuda"), ValueError, r"device 'cuda' requested but CUDA is not available here; use cpu")]
          if not torch.cuda.is_available() else []),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(overrides, error, message):
    with pytest.raises(error, match=message):
        build(**overrides)


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_model_that_cannot_take_the_tasks_is_named_before_training(vectorize):
    """Another channel count or input size, or fewer class scores than ways: one line naming the
    model, the inputs and where they failed, not a warning that it "cannot be vectorized" and then
    torch's error at the first meta-iteration."""
    from bilevel_maml.models import Conv4

    with pytest.raises(ValueError, match=r"^Conv4 cannot take the tasks' inputs: a support set of shape \(5, 1, 8, 8\) "
                                         r"\(float32\) failed at .*\(models.py:\d+\): RuntimeError: Given groups=1, "
                                         r"weight of size \[8, 3, 3, 3\], expected input\[5, 1, 8, 8\] to have 3 "
                                         r"channels, but got 1 channels instead$"):
        build(model=Conv4(ways=5, in_channels=3, image_size=8, hidden=8), vectorize=vectorize)
    with pytest.raises(ValueError, match=r"^Sequential cannot take the tasks' inputs: a support set of shape "
                                         r"\(5, 1, 8, 8\) \(float32\) failed at MLP.forward \(models.py:\d+\): "
                                         r"RuntimeError: "):
        build(model=torch.nn.Sequential(torch.nn.Flatten(), MLP(28 * 28, 5)), vectorize=vectorize)
    with pytest.raises(ValueError, match=r"^Sequential gives 3 class scores per example, and the tasks are 5-way: "
                                         r"build it with \(at least\) 5 outputs$"):
        build(model=torch.nn.Sequential(torch.nn.Flatten(), MLP(64, 3)), vectorize=vectorize)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("mistake, message", [
    ("none", r"^Slip\.inner_update\(\) returned NoneType; it must return one per parameter, of its shape: "
             r"weight \(5, 4\), bias \(5,\)$"),
    ("one short", r"^Slip\.inner_update\(\) returned 1 tensor of shape \(5, 4\); it must return"),
    ("flattened", r"^Slip\.inner_update\(\) returned 2 tensors of shapes \(20,\), \(5,\); it must return"),
    ("loss per example", r"^Slip\.inner_loss\(\) gave a loss of shape \(5,\) for one task; a loss is one number per "
                         r"task \(a 0-d tensor: the mean over the task's examples, say\)$"),
    ("a float", r"^Slip\.inner_loss\(\) gave float for one task; a loss is one number per task"),
])
def test_a_hook_that_returns_the_wrong_thing_is_named_at_its_first_call(vectorize, mistake, message):
    """What inner_update and inner_loss return is checked on both paths: one tensor per parameter of
    its shape (a shorter tuple left the last parameters at θ unnoticed), and one number per task (a
    loss per example was summed over stacked tasks unnoticed, and failed inside autograd task by task)."""
    import torch.nn.functional as F

    class Slip(MAMLLower):
        def inner_update(self, params, grads, step=0):
            new = [p - self.inner_lr * g for p, g in zip(params, grads)]
            return {"none": None, "one short": tuple(new[:-1]),
                    "flattened": tuple(n.flatten() for n in new)}.get(mistake, new)

        def inner_loss(self, params, batch, step=0):
            inputs, labels = batch
            reduction = "none" if mistake == "loss per example" else "mean"
            loss = F.cross_entropy(self.forward(inputs, params, step), labels, reduction=reduction)
            return 0.5 if mistake == "a float" else loss

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 5)
    env = EpisodicEnv(lambda: (torch.rand(10, 4), torch.arange(5).repeat(2)), ways=5, shots=1)
    engine = MetaEngine(MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=2),
                        Slip(model, inner_lr=0.1), env, meta_iterations=1, vectorize=vectorize)
    theta = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        engine.run()
    assert all(torch.equal(a, b) for a, b in zip(theta, model.parameters()))


def test_a_loss_fn_that_is_not_one_number_per_task_is_named_when_the_engine_is_built():
    def squared_error_per_point(outputs, targets):
        return (outputs - targets) ** 2

    with pytest.raises(ValueError, match=r"^the task learner's loss_fn \(squared_error_per_point\) gives a loss of shape "
                                         r"\(5, 1\) for one task's examples; a loss is one number per task"):
        build_engine("maml", MLP(1, 1, (8,)), lambda: (torch.rand(10, 1), torch.rand(10, 1)), regression=True,
                     shots=5, meta_batch_size=2, loss_fn=squared_error_per_point)


def test_checking_the_model_on_a_task_changes_neither_the_model_nor_any_random_stream():
    """The check runs the model once in training mode: BatchNorm's running statistics and the
    random streams a dropout draws from are put back (the task stream: test_the_probe_does_not_change_the_task_stream)."""
    from bilevel_maml import execution

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8),
                              torch.nn.Dropout(0.3), torch.nn.Linear(8, 5))
    engine = build(model=net, vectorize=False)
    (inputs, labels), _ = engine.env.sample_tasks(1)
    buffers, rng = [b.clone() for b in net.buffers()], torch.get_rng_state()
    execution.check_model_takes_tasks(engine, inputs[0], labels[0])
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("sampler", ["learn2learn", "device"])
def test_a_split_with_too_few_classes_or_examples_is_named(sampler):
    """Omniglot-small's validation split has 108 classes where training has 436: which split is short."""
    def tasksets(ways, per_class):
        def split(classes, examples):
            characters = [torch.rand(examples, 1, 8, 8) for _ in range(classes)]
            return task_dataset(CharacterImages(characters), ways=ways, samples_per_class=per_class)
        return {"train": split(6, 4), "validation": split(4, 3), "test": split(6, 4)}

    with pytest.raises(ValueError, match=r"^the validation split: ways=5 is more than its 4 classes; choose ways <= 4$"):
        build(tasksets=tasksets(5, 2), sampler=sampler)
    with pytest.raises(ValueError, match=r"^the validation split: shots \+ query_shots = 2 \+ 2 = 4 is more than the "
                                         r"3 examples of the smallest class; choose shots \+ query_shots <= 3$"):
        build(tasksets=tasksets(4, 4), sampler=sampler, ways=4, shots=2, query_shots=2)


def test_problems_given_in_the_wrong_places_are_named():
    model = torch.nn.Linear(4, 5)
    upper, lower = MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1)), MAMLLower(model, inner_lr=0.1)
    env = EpisodicEnv(lambda: (torch.rand(10, 4), torch.arange(5).repeat(2)), ways=5, shots=1)
    with pytest.raises(TypeError, match=r"^upper must be a MetaLearner, got MAMLLower$"):
        MetaEngine(lower, upper, env)
    with pytest.raises(TypeError, match=r"^lower must be a TaskLearner, got Linear$"):
        MetaEngine(upper, model, env)
    with pytest.raises(TypeError, match=r"^module must be a torch.nn.Module \(θ's network\), got int$"):
        MAMLLower(3, inner_lr=0.1)
    with pytest.raises(TypeError, match=r"^env must be an EpisodicEnv, got NoneType$"):
        MetaEngine(upper, lower, None)
    with pytest.raises(TypeError, match=r"^valid_env must be an EpisodicEnv or None, got int$"):
        MetaEngine(upper, lower, env, valid_env=3)

    # the task learner runs its module with θ in place of its parameters: another network is a slip
    with pytest.raises(ValueError, match=r"^the task learner's network is not the meta-learner's \(weight is \(5, 6\) "
                                         r"in the task learner's and \(5, 4\) in the meta-learner's\); every inner "
                                         r"loop starts from θ, the meta-learner's parameters: pass the same module to "
                                         r"both$"):
        MetaEngine(upper, MAMLLower(torch.nn.Linear(6, 5), inner_lr=0.1), env)
    with pytest.raises(ValueError, match=r"\(bias is absent in the task learner's and \(5,\) in the meta-learner's\)"):
        MetaEngine(upper, MAMLLower(torch.nn.Linear(4, 5, bias=False), inner_lr=0.1), env)
    twin = MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1))
    MetaEngine(twin, MAMLLower(torch.nn.Linear(4, 5), inner_lr=0.1), env)  # a twin of the network is the same
    with pytest.raises(ValueError, match=r"^this MAMLUpper already belongs to a MetaEngine \(Betty binds a problem "
                                         r"to one engine\); build new problems for another engine$"):
        MetaEngine(twin, MAMLLower(model, inner_lr=0.1), env)

    # an optimizer over a copy of the network would leave θ unchanged, silently
    with pytest.raises(ValueError, match=r"^the optimizer holds none of the module's parameters \(θ\), so no outer "
                                         r"step would change them; build it over this module's parameters\(\) "
                                         r"\(SGD\(module.parameters\(\), \.\.\.\)\), or, to hold θ fixed, set "
                                         r"requires_grad=False on them$"):
        MAMLUpper(model, torch.optim.SGD(torch.nn.Linear(4, 5).parameters(), lr=0.1))
    frozen = torch.nn.Linear(4, 5).requires_grad_(False)  # θ held fixed, something else learned
    MAMLUpper(frozen, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))

    class ScaledContext(MAMLLower):  # a variant whose meta-parameter is computed, not a parameter
        def meta_parameters(self):
            return (torch.ones(3, requires_grad=True) * 2,)

    with pytest.raises(TypeError, match=r"^ScaledContext\.meta_parameters\(\) must return leaf tensors that "
                                        r"require grad \(nn\.Parameter\), got Tensor$"):
        MetaEngine(upper, ScaledContext(model, inner_lr=0.1), env)


def test_a_state_of_another_algorithm_is_refused_before_anything_is_loaded():
    def engine(algorithm):
        torch.manual_seed(0)
        built = build(algorithm=algorithm)
        built.run()
        return built

    maml, meta_sgd = engine("maml"), engine("metasgd")
    before = {name: value.clone() for name, value in meta_sgd.meta_learner.module.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the checkpoint holds 0 task-learner meta-parameters, MetaSGDLower has 6: "
                                         r"was it saved by another algorithm\?$"):
        meta_sgd.load_state_dict(maml.state_dict())
    after = meta_sgd.meta_learner.module.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())  # θ as it was


def test_problem_classes_check_their_own_arguments():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="inner_lr must be a positive finite number, got -0.1"):
        MAMLLower(model, inner_lr=-0.1)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1, got 0"):
        MAMLLower(model, inner_lr=0.1, inner_steps=0)
    with pytest.raises(ValueError, match="λ\\) must be a positive finite number, got -1"):
        IMAMLLower(model, inner_lr=0.1, lam=-1)
    with pytest.raises(ValueError, match="meta_batch_size must be an integer >= 1, got 0"):
        MAMLUpper(model, torch.optim.SGD(model.parameters(), lr=0.1), meta_batch_size=0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        MAMLUpper(model, "adam")


def test_missing_data_folder_says_where_the_data_must_be(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere' does not exist. Place images_background_small1.zip and images_background_small2.zip"):
        omniglot_small_tasksets(missing, ways=5, samples_per_class=2)
    with pytest.raises(DataNotFoundError, match="lacks images_background_small1.zip, images_background_small2.zip"):
        omniglot_small_tasksets(tmp_path, ways=5, samples_per_class=2)
    assert issubclass(DataNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("name, kwargs, message", [
    ("conv4", dict(width=-3), "width must be an integer >= 1, got -3"),
    ("resnet12", dict(width=0), "width must be an integer >= 1, got 0"),
    ("mlp", dict(ways=0), "ways must be an integer >= 1, got 0"),
])
def test_models_refuse_sizes_that_are_not_positive(name, kwargs, message):
    from bilevel_maml.models import build_model

    arguments = {"ways": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(name, arguments.pop("ways"), **arguments)


def test_a_float64_model_gets_float64_tasks_from_a_float32_source():
    """build_engine's dtype defaults to the model's: the float32 images are handed out as float64 (they were
    handed out as drawn, and the first convolution of the float64 model failed inside torch)."""
    engine = build(model=flat_model().double(), meta_iterations=2)
    engine.run()
    assert engine.env.batch["support"][0].dtype == torch.float64
    assert all(p.dtype == torch.float64 and p.isfinite().all() for p in engine.meta_learner.module.parameters())
    assert engine.test(num_tasks=3)["tasks"] == 3
