"""Third-party variants reach the CLI: a --plugin module and an entry point, each trained, evaluated and
resumed through the console script in fresh processes that know nothing of them beforehand. Each such
process takes ~5 s, most of it importing torch: the default suite keeps one run of each kind (a --plugin
module, an entry point, a name a plugin gives on the command line) and `make test-slow` the others."""

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bilevel_maml import cli

VENV_BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VARIANT = textwrap.dedent('''
    """A user's variant: MAML with half the inner step size, written on the public hooks only."""
    from bilevel_maml.problems import MAMLLower, MAMLUpper


    class HalfStepLower(MAMLLower):
        def inner_update(self, params, grads, step):
            return tuple(p if g is None else p - 0.5 * self.inner_lr * g for p, g in zip(params, grads))


    class HalfStepUpper(MAMLUpper):
        def __init__(self, *args, boost: float = 1.0, **kwargs):  # an option of the variant's own
            super().__init__(*args, **kwargs)
            self.boost = boost
''')


def console(*arguments, path: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(path), "WANDB_SILENT": "true"}
    return subprocess.run([str(VENV_BIN / "bilevel-maml"), *map(str, arguments)], capture_output=True, text=True,
                          timeout=300, env=environment, cwd=path)


def sinusoid_run(output, *extra):
    return ["train", "--dataset", "sinusoid", "--model", "mlp", "--width", "8", "--iterations", "4",
            "--meta-batch-size", "2", "--valid-every", "2", "--valid-tasks", "3", "--test-tasks", "5",
            "--checkpoint-every", "2", "--wandb", "disabled", "--output", str(output), *extra]


def train_evaluate_resume(tmp_path, algorithm, *train_extra, resume=True):
    output = tmp_path / "run"
    trained = console(*sinusoid_run(output, "--algorithm", algorithm, *train_extra), path=tmp_path)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((output / "config.json").read_text())
    evaluated = console("evaluate", "--output", output, "--test-tasks", "5", path=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((output / "evaluation.json").read_text())["config"]["algorithm"] == algorithm
    if not resume:
        return config
    resumed = console("resume", "--output", output, "--iterations", "6", path=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((output / "result.json").read_text())["iteration"] in (4, 6)
    assert "from iteration 4" in resumed.stdout
    return config


def test_a_plugin_module_is_recorded_so_evaluate_and_resume_find_the_variant(tmp_path):
    (tmp_path / "my_variants.py").write_text(VARIANT + textwrap.dedent('''
        from bilevel_maml import register_algorithm

        register_algorithm("half-step", HalfStepUpper, HalfStepLower)
    '''))
    config = train_evaluate_resume(tmp_path, "half-step", "--plugin", "my_variants", "--option", "boost=2.5")
    assert config["plugins"] == ["my_variants"]
    assert config["algorithm_options"] == {"boost": 2.5}


def test_an_entry_point_makes_a_variant_known_without_any_flag(tmp_path):
    (tmp_path / "packaged_variant.py").write_text(VARIANT + "\nALGORITHM = (HalfStepUpper, HalfStepLower)\n")
    metadata = tmp_path / "packaged_variant-0.1.dist-info"  # what installing the package would write
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: packaged-variant\nVersion: 0.1\n")
    (metadata / "entry_points.txt").write_text("[bilevel_maml.algorithms]\nhalf-step-ep = packaged_variant:ALGORITHM\n")
    config = train_evaluate_resume(tmp_path, "half-step-ep", resume=False)
    assert config["plugins"] == ["packaged_variant"]  # its module, for a process without the entry point


def test_an_unknown_algorithm_lists_the_known_ones_and_how_to_register_one(tmp_path):
    with pytest.raises(cli.BadInput) as error:
        cli.run(["train", "--algorithm", "my-variant", "--output", str(tmp_path / "x")])
    message = str(error.value)
    assert "unknown algorithm 'my-variant'; known: anil, boil, fomaml, imaml, maml, maml++, metasgd, reptile" in message
    assert "--plugin MODULE" in message and "'bilevel_maml.algorithms'" in message
    with pytest.raises(cli.BadInput, match=r"--plugin: plugin module 'no_such_module' could not be imported "
                                            r"\(ModuleNotFoundError: No module named 'no_such_module'\)"):
        cli.run(["train", "--plugin", "no_such_module", "--output", str(tmp_path / "x")])


def test_a_variant_cannot_take_the_name_of_another(tmp_path, monkeypatch):
    """Registering other classes under a known name (a built-in one, say) is refused: runs of `--algorithm maml`
    would quietly run other code. The same classes defined again (a module reloaded) replace the old ones; a
    plugin that fails is named with its own file and line."""
    from bilevel_maml import ALGORITHMS, MAMLLower, MAMLUpper, register_algorithm

    class Other(MAMLLower):
        pass

    with pytest.raises(ValueError, match=r"algorithm 'maml' is already registered \(bilevel_maml.problems.maml."
                                         r"MAMLUpper and bilevel_maml.problems.maml.MAMLLower\); register the variant "
                                         r"under another name"):
        register_algorithm("MAML", MAMLUpper, Other)
    assert ALGORITHMS["maml"] == (MAMLUpper, MAMLLower)
    register_algorithm("maml", MAMLUpper, MAMLLower)  # the same classes: nothing changes
    monkeypatch.setitem(ALGORITHMS, "other-variant", (MAMLUpper, Other))
    redefined = type("Other", (MAMLLower,), {"__module__": Other.__module__, "__qualname__": Other.__qualname__})
    register_algorithm("other-variant", MAMLUpper, redefined)
    assert ALGORITHMS["other-variant"] == (MAMLUpper, redefined)

    (tmp_path / "shadowing.py").write_text(VARIANT + textwrap.dedent('''
        from bilevel_maml import register_algorithm

        register_algorithm("maml", HalfStepUpper, HalfStepLower)
    '''))
    line = (tmp_path / "shadowing.py").read_text().splitlines().index('register_algorithm("maml", HalfStepUpper, '
                                                                     'HalfStepLower)') + 1
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(cli.BadInput, match=rf"--plugin: plugin module 'shadowing' failed while it was imported at "
                                            rf".*shadowing.py:{line} \(ValueError: algorithm 'maml' is already registered"):
        cli.run(["train", "--plugin", "shadowing", "--output", str(tmp_path / "x")])
    assert ALGORITHMS["maml"] == (MAMLUpper, MAMLLower)


@pytest.mark.slow
def test_a_run_whose_variant_is_gone_says_so_in_one_line(tmp_path):
    (tmp_path / "short_lived.py").write_text(VARIANT + textwrap.dedent('''
        from bilevel_maml import register_algorithm

        register_algorithm("short-lived", HalfStepUpper, HalfStepLower)
    '''))
    output = tmp_path / "run"
    assert console(*sinusoid_run(output, "--algorithm", "short-lived", "--plugin", "short_lived"),
                   path=tmp_path).returncode == 0
    (tmp_path / "short_lived.py").unlink()
    evaluated = console("evaluate", "--output", output, path=tmp_path)
    assert evaluated.returncode == 2
    assert evaluated.stderr.strip().splitlines() == [
        "bilevel-maml: the run's --plugin: plugin module 'short_lived' could not be imported (ModuleNotFoundError: "
        "No module named 'short_lived'); it must be importable from this Python (installed, on PYTHONPATH, or a file "
        f"in the current folder), or be in {tmp_path}, where the run found it"]


def test_a_slip_in_a_variants_own_code_is_one_line_naming_its_line(tmp_path, monkeypatch, capsys):
    """A TypeError that Python or PyTorch raises in a variant's own hook (adding to the dict that
    ``training_step`` returns, as if it were the loss) stays one line, and names the hook's line, which
    the message alone does not. What the library raises itself is left as it is: its message names the
    bad value (the run_script case below, and every message these tests anchor with ``$``)."""
    from bilevel_maml import ALGORITHMS, MAMLLower, MAMLUpper
    from bilevel_maml.validation import check_positive

    class PenaltyUpper(MAMLUpper):
        def training_step(self, batch):
            return super().training_step(batch) + 0.0

    line = inspect.getsourcelines(PenaltyUpper.training_step)[1] + 1
    monkeypatch.setitem(ALGORITHMS, "penalty", (PenaltyUpper, MAMLLower))
    with pytest.raises(cli.BadInput, match=rf"^bilevel-maml train: unsupported operand type\(s\) for \+: 'dict' and "
                                            rf"'float' \(TypeError at PenaltyUpper\.training_step "
                                            rf"\(test_plugins\.py:{line}\)\)$"):
        cli.run(sinusoid_run(tmp_path / "run", "--algorithm", "penalty"))

    def script():
        return {"rates": 0.1} * 2

    for main, expected in [(script, "unsupported operand type(s) for *: 'dict' and 'int' (TypeError at script "
                                    f"(test_plugins.py:{inspect.getsourcelines(script)[1] + 1}))"),
                           (lambda: check_positive("inner_lr", -1.0),
                            "inner_lr must be a positive finite number, got -1.0")]:
        with pytest.raises(SystemExit) as stop:
            cli.run_script(main, prog="script.py")
        assert stop.value.code == 2 and capsys.readouterr().err == f"script.py: {expected}\n"


@pytest.mark.slow
def test_the_command_finds_a_plugin_in_the_folder_it_runs_in(tmp_path):
    """`bilevel-maml train --plugin beside` with beside.py in the current folder and no PYTHONPATH, as
    `python -m bilevel_maml` finds it; evaluate there finds it again, and so does evaluate from another
    folder, in the folder the run recorded; once the file is gone, one line names the run's plugin and
    that folder. The folder is looked in last: its wave.py does not replace the standard library's."""
    (tmp_path / "beside.py").write_text(VARIANT + textwrap.dedent('''
        import wave  # the standard library's, not the file beside this one

        from bilevel_maml import register_algorithm

        assert hasattr(wave, "open")
        register_algorithm("beside", HalfStepUpper, HalfStepLower)
    '''))
    (tmp_path / "wave.py").write_text("raise AssertionError('the current folder replaced an installed module')\n")
    (tmp_path / "elsewhere").mkdir()
    environment = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "WANDB_SILENT": "true"}

    def command(*arguments, cwd):
        return subprocess.run([str(VENV_BIN / "bilevel-maml"), *map(str, arguments)], capture_output=True, text=True,
                              timeout=300, env=environment, cwd=cwd)

    trained = command(*sinusoid_run("run", "--algorithm", "beside", "--plugin", "beside"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = command("evaluate", "--output", "run", "--test-tasks", "3", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "beside sinusoid 10-shot regression" in evaluated.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["plugin_folders"] == {"beside": str(tmp_path)}
    elsewhere = command("evaluate", "--output", tmp_path / "run", "--test-tasks", "3", cwd=tmp_path / "elsewhere")
    assert elsewhere.returncode == 0, elsewhere.stderr  # from the folder the run recorded it was imported from
    assert "beside sinusoid 10-shot regression" in elsewhere.stdout
    (tmp_path / "beside.py").rename(tmp_path / "moved.py")
    gone = command("evaluate", "--output", tmp_path / "run", cwd=tmp_path / "elsewhere")
    assert gone.returncode == 2
    assert gone.stderr.strip() == (
        "bilevel-maml: the run's --plugin: plugin module 'beside' could not be imported (ModuleNotFoundError: No "
        "module named 'beside'); it must be importable from this Python (installed, on PYTHONPATH, or a file in the "
        f"current folder), or be in {tmp_path}, where the run found it")


def test_a_config_file_sets_algorithm_options_as_a_table(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('algorithm = "maml++"\nplugins = []\n[algorithm_options]\nmulti_step_loss = false\n'
                      'first_order_iterations = 7\nmulti_step_loss_iterations = "none"\n')
    args = cli.parse(["train", "--config", str(config), "--option", "cosine_lr=false"])
    assert args.algorithm == "maml++"
    assert dict(args.algorithm_options) == {"multi_step_loss": False, "first_order_iterations": 7,
                                            "multi_step_loss_iterations": None, "cosine_lr": False}


# -- networks of users' own: register_model ---------------------------------------------------------
@pytest.mark.slow
def test_a_registered_model_is_built_by_train_evaluate_and_resume(tmp_path):
    """examples/cavia.py registers its algorithm and its network (context-mlp); the run's config records the
    module, and every command in a new process builds the network again."""
    shutil.copy(EXAMPLES / "cavia.py", tmp_path / "cavia.py")
    config = train_evaluate_resume(tmp_path, "cavia", "--plugin", "cavia", "--model", "context-mlp")
    assert (config["plugins"], config["model"]) == (["cavia"], "context-mlp")
    theta = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["engine"]["theta"]
    assert theta["body.0.weight"].shape == (8, 5)  # --width 8 on 1 + 4 inputs
    assert torch.equal(theta["context"], torch.zeros(4))  # CAVIA's context starts every task at zero: never meta-learned


@pytest.fixture
def registries():
    """The registries of models and datasets, as they were before the test once it ends."""
    from bilevel_maml.data.sources import DATASETS
    from bilevel_maml.models import REGISTERED_MODELS

    saved = [(registry, dict(registry)) for registry in (REGISTERED_MODELS, DATASETS)]
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)



def test_registering_the_wrong_kind_of_thing_is_named(registries):
    """The mistakes a plugin author makes first: a network already built for a factory, the two
    problem classes swapped, the loader and the spec swapped."""
    from bilevel_maml import MAMLLower, MAMLUpper
    from bilevel_maml.data.sources import DATASETS, register_dataset
    from bilevel_maml.models import register_model
    from bilevel_maml.problems import register_algorithm

    with pytest.raises(TypeError, match=r"^register_model needs a function that builds the network, got a Linear "
                                        r"already built; pass e\.g\. lambda ways, \*\*given: Linear\(\.\.\.\)$"):
        register_model("built", torch.nn.Linear(1, 5))
    with pytest.raises(TypeError, match=r"^register_algorithm needs a MetaLearner subclass and a TaskLearner "
                                        r"subclass, got <class .*MAMLLower'> and <class .*MAMLUpper'>$"):
        register_algorithm("swapped", MAMLLower, MAMLUpper)
    with pytest.raises(TypeError, match=r"^register_dataset needs a callable that returns the tasksets, got DatasetSpec"):
        register_dataset("swapped", DATASETS["sinusoid"], lambda **given: None)

def test_a_config_file_names_what_its_own_plugin_registers(tmp_path):
    """The file's plugins are loaded before its values are checked, so its algorithm, model and
    dataset may be ones they register."""
    shutil.copy(EXAMPLES / "cavia.py", tmp_path / "cavia.py")
    (tmp_path / "run.yaml").write_text("plugins: [cavia]\nalgorithm: cavia\nmodel: context-mlp\ndataset: sinusoid\n"
                                       "iterations: 2\ntest-tasks: 5\nwandb: disabled\n")
    trained = console("train", "--config", "run.yaml", "--output", tmp_path / "run", path=tmp_path)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["algorithm"], config["model"], config["plugins"]) == ("cavia", "context-mlp", ["cavia"])


@pytest.mark.parametrize("plugin", [
    pytest.param(["--config", "plugin.yaml"], id="config-file"),
    pytest.param(["--conf", "plugin.yaml"], id="abbreviated-config", marks=pytest.mark.slow),
    pytest.param(["--plug", "cavia"], id="abbreviated", marks=pytest.mark.slow),
    pytest.param(["--plugin=cavia"], id="equals", marks=pytest.mark.slow)])
def test_names_on_the_command_line_may_come_from_a_plugin_however_it_is_named(tmp_path, plugin):
    """The command line's --algorithm and --model are checked once every plugin is loaded, whether
    the plugin comes on the command line in any form argparse takes or from the --config file."""
    shutil.copy(EXAMPLES / "cavia.py", tmp_path / "cavia.py")
    (tmp_path / "plugin.yaml").write_text("plugins: [cavia]\n")
    parsed = subprocess.run(
        [sys.executable, "-c", "import sys; from bilevel_maml import cli; a = cli.parse(sys.argv[1:]); "
                               "print(a.algorithm, a.model, a.plugins)",
         "train", "--algorithm", "CAVIA", "--model", "context-mlp", "--dataset", "sinusoid", *plugin],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert parsed.returncode == 0, parsed.stderr
    assert parsed.stdout.split() == ["cavia", "context-mlp", "['cavia']"]


@pytest.mark.slow
def test_help_lists_what_the_plugins_register(tmp_path):
    """Before or after --help (argparse prints help the moment it reads the flag)."""
    shutil.copy(EXAMPLES / "cavia.py", tmp_path / "cavia.py")
    for argv in (["--plug", "cavia", "--help"], ["--help", "--plugin", "cavia"], ["-h", "--plugin=cavia"]):
        shown = " ".join(console("train", *argv, path=tmp_path).stdout.split())
        assert "an unknown name lists the known ones; registered now: cavia (default: maml)" in shown, argv
        assert "(default: conv4; mlp for sinusoid); registered now: context-conv4, context-mlp" in shown, argv
    assert "registered now" not in " ".join(console("train", "--help", path=tmp_path).stdout.split())


def test_model_names_are_checked_and_a_factorys_failure_is_one_line(tmp_path, registries, capsys):
    from bilevel_maml.models import register_model

    def vector_only(ways, image_size):
        if image_size is not None:
            raise ValueError("vector-only takes vector inputs")
        return torch.nn.Linear(1, ways)

    register_model("Vector-Only", vector_only)
    register_model("not-a-module", lambda **given: "a string")
    with pytest.raises(ValueError, match="^model 'mlp' is built in; register your network under another name$"):
        register_model("MLP", vector_only)
    with pytest.raises(ValueError, match=r"^model 'vector-only' is already registered \(test_plugins\..*vector_only\)"):
        register_model("vector-only", lambda **given: torch.nn.Linear(1, 1))
    register_model("vector-only", vector_only)  # the same factory again (a reloaded module): accepted

    with pytest.raises(cli.BadInput, match=r"argument --model: unknown model 'nope'; known: conv4, conv4-strided, "
                                            r"resnet12, mlp, not-a-module, vector-only\. A network of your own is "
                                            r"registered with bilevel_maml\.models\.register_model"):
        cli.run(["train", "--model", "nope", "--output", str(tmp_path / "x")])
    with pytest.raises(cli.BadInput, match=r"^bilevel-maml: --model vector-only: ValueError: vector-only takes vector "
                                            r"inputs$"):
        cli.run(["train", "--model", "vector-only", "--output", str(tmp_path / "x")])
    with pytest.raises(cli.BadInput, match=r"^bilevel-maml: --model not-a-module: TypeError: the factory of model "
                                            r"'not-a-module' returned str, not a torch.nn.Module$"):
        cli.run(sinusoid_run(tmp_path / "x", "--model", "not-a-module"))
    assert not (tmp_path / "x").exists()

    vector_only.__module__ = "__main__"  # as if a script registered it and called the CLI itself
    register_model("scripted", vector_only)
    cli.run(sinusoid_run(tmp_path / "scripted", "--model", "scripted", "--iterations", "1", "--checkpoint-every", "1"))
    assert "model 'scripted' is defined in the running script (__main__)" in capsys.readouterr().err
    assert json.loads((tmp_path / "scripted" / "config.json").read_text())["plugins"] == []


# -- task sources of users' own: register_dataset ---------------------------------------------------
@pytest.mark.slow
def test_a_registered_dataset_is_loaded_by_every_command_and_a_resumed_run_draws_the_same_tasks(tmp_path):
    """examples/bring_your_own.py registers its texture tasks (--dataset textures); they draw from the
    global random stream, which each split's env seeds and checkpoints: 4 iterations resumed to 6 reach
    the θ of 6 straight."""
    shutil.copy(EXAMPLES / "bring_your_own.py", tmp_path / "textures.py")
    common = ["--plugin", "textures", "--dataset", "textures", "--ways", "3"]  # the MLP on flattened 3×32×32 crops
    config = train_evaluate_resume(tmp_path, "maml", *common, resume=False)
    assert (config["plugins"], config["dataset"], config["inner_lr"]) == (["textures"], "textures", 0.1)
    resumed = console("resume", "--output", tmp_path / "run", "--iterations", "6", path=tmp_path)
    assert resumed.returncode == 0 and "from iteration 4" in resumed.stdout, resumed.stderr
    straight = console(*sinusoid_run(tmp_path / "straight", *common, "--iterations", "6"), path=tmp_path)
    assert straight.returncode == 0, straight.stderr
    resumed, uninterrupted = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=False)["engine"]
                              for run in ("run", "straight"))
    assert resumed["meta_iteration"] == uninterrupted["meta_iteration"] == 6
    assert resumed["theta"]["1.net.0.weight"].shape == (8, 3 * 32 * 32)
    assert all(torch.equal(resumed["theta"][k], uninterrupted["theta"][k]) for k in uninterrupted["theta"])


@pytest.mark.slow
def test_entry_points_make_a_network_and_a_task_source_known_without_any_flag(tmp_path):
    """A package that ships only a network and a dataset (no algorithm) declares them in their groups; a broken
    entry point of one group is skipped with a warning, the others still load."""
    (tmp_path / "packaged_parts.py").write_text(textwrap.dedent('''
        import torch
        from bilevel_maml.data import DatasetSpec, SinusoidTasks


        def wide_mlp(ways, in_features, width=None):
            hidden = 3 * (width or 4)
            return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, ways))


        def waves(samples_per_class):
            return SinusoidTasks(points=samples_per_class)


        DATASET = (waves, DatasetSpec(in_channels=1, image_size=0, model="wide-mlp", inner_lr=0.05, regression=True,
                                      shots=4))
    '''))
    metadata = tmp_path / "packaged_parts-0.1.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: packaged-parts\nVersion: 0.1\n")
    (metadata / "entry_points.txt").write_text(
        "[bilevel_maml.models]\nwide-mlp = packaged_parts:wide_mlp\n\n"
        "[bilevel_maml.datasets]\nwaves = packaged_parts:DATASET\nbroken = packaged_parts:NOTHING\n")
    output = tmp_path / "run"
    trained = console("train", "--dataset", "waves", "--width", "2", "--iterations", "2", "--test-tasks", "5",
                      "--wandb", "disabled", "--output", output, path=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "entry point 'broken' = 'packaged_parts:NOTHING' of group 'bilevel_maml.datasets' was skipped" in trained.stderr
    config = json.loads((output / "config.json").read_text())
    assert (config["model"], config["shots"], config["inner_lr"], config["plugins"]) == (
        "wide-mlp", 4, 0.05, ["packaged_parts"])
    theta = torch.load(output / "checkpoints" / "last.pt", weights_only=False)["engine"]["theta"]
    assert theta["0.weight"].shape == (6, 1) and theta["2.weight"].shape == (1, 6)
    evaluated = console("evaluate", "--output", output, "--test-tasks", "5", path=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr


def test_a_registered_datasets_inner_loops_are_the_command_lines_defaults_and_checked(tmp_path, registries):
    from bilevel_maml import arguments, runs
    from bilevel_maml.data import DatasetSpec, SinusoidTasks, register_dataset

    def waves(samples_per_class):
        return SinusoidTasks(points=samples_per_class)

    loops = {"maml": {"inner_steps": 3}, "iMAML": {"inner_steps": 4, "inner_lr": 0.02, "lam": 2.0}}  # names: any case
    register_dataset("waves", waves, DatasetSpec(1, 0, "mlp", 0.05, regression=True, inner_loops=loops))

    def loop(*flags):
        args = arguments.build_parser().parse_args(["train", "--dataset", "waves", *flags, "--output", str(tmp_path)])
        config = runs._run_config(args)
        return config["inner_steps"], config["inner_lr"], config["lam"], config["eval_inner_steps"]

    assert loop() == (3, 0.05, 1.0, 3)  # the spec's inner_lr where its loop names none
    assert loop("--algorithm", "imaml") == (4, 0.02, 2.0, 4)
    assert loop("--algorithm", "imaml", "--inner-lr", "0.5", "--eval-inner-steps", "9") == (4, 0.5, 2.0, 9)
    assert loop("--algorithm", "fomaml") == (1, 0.05, 1.0, 1)  # the spec has no loop of its own for it

    bad = [({"maml": {"steps": 3}}, ValueError, r"^spec.inner_loops\['maml'\] has 'steps'; allowed: inner_steps, "
                                                r"inner_lr, lam$"),
           ({"maml": {"inner_steps": 2.5}}, TypeError, r"^spec.inner_loops\['maml'\]\['inner_steps'\] must be an "
                                                      r"integer >= 1, got 2.5"),
           ({"maml": {"inner_lr": 0}}, ValueError, r"^spec.inner_loops\['maml'\]\['inner_lr'\] must be a positive"),
           ({"maml": 3}, TypeError, r"^spec.inner_loops\['maml'\] must map inner_steps, inner_lr, lam to values, got 3$"),
           ({1: {}}, TypeError, r"^spec.inner_loops\[1\]: the keys are algorithm names \(strings\)$"),
           ([("maml", {})], TypeError, r"^spec.inner_loops must map algorithm names to settings, got list$")]
    for inner_loops, error, message in bad:
        with pytest.raises(error, match=message):
            register_dataset("other", waves, DatasetSpec(1, 0, "mlp", 0.1, regression=True, inner_loops=inner_loops))
    assert "other" not in runs.DATASETS


def test_dataset_names_are_checked_and_a_loaders_failure_is_one_line(tmp_path, registries, capsys):
    from bilevel_maml.data import DatasetSpec, SinusoidTasks, register_dataset

    spec = DatasetSpec(in_channels=1, image_size=0, model="mlp", inner_lr=0.1, regression=True, shots=5)

    def points(samples_per_class, data_root):
        if data_root is not None:
            raise FileNotFoundError(f"nothing to read in {data_root}")
        return SinusoidTasks(points=samples_per_class)

    register_dataset("Points", points, spec)
    with pytest.raises(ValueError, match="^dataset 'omniglot' is built in; register your task source under another name$"):
        register_dataset("omniglot", points, spec)
    with pytest.raises(ValueError, match=r"^dataset 'points' is already registered \(test_plugins\..*points\)"):
        register_dataset("points", lambda **given: None, spec)
    with pytest.raises(ValueError, match=r"^spec.inner_lr must be a positive finite number, got 0"):
        register_dataset("other", points, DatasetSpec(1, 0, "mlp", 0))

    with pytest.raises(cli.BadInput, match=r"argument --dataset: unknown dataset 'nope'; known: omniglot-small, omniglot, "
                                            r"mini-imagenet, tiered-imagenet, cifarfs, fc100, sinusoid, points\. A task "
                                            r"source of your own is registered with bilevel_maml\.data\.register_dataset"):
        cli.run(["train", "--dataset", "nope", "--output", str(tmp_path / "x")])
    run = ["train", "--dataset", "points", "--iterations", "1", "--test-tasks", "5", "--wandb", "disabled"]
    with pytest.raises(cli.BadInput, match=r"^bilevel-maml: --dataset points: FileNotFoundError: nothing to read in "
                                            r"somewhere$"):
        cli.run([*run, "--data-root", "somewhere", "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()

    def planes(samples_per_class):  # y = w·x + b on 2 features: a vector input wider than sinusoid's
        def sample():
            w, b, x = torch.randn(2), torch.randn(()), torch.randn(samples_per_class, 2)
            return x, (x @ w + b).unsqueeze(1)
        return sample

    register_dataset("planes", planes, DatasetSpec(in_channels=2, image_size=0, model="mlp", inner_lr=0.1,
                                                   regression=True, shots=5))
    cli.run([*run, "--dataset", "planes", "--width", "8", "--output", str(tmp_path / "planes")])
    theta = torch.load(tmp_path / "planes" / "checkpoints" / "last.pt", weights_only=False)["engine"]["theta"]
    assert theta["net.0.weight"].shape == (8, 2) and theta["net.4.weight"].shape == (1, 8)
    with pytest.raises(cli.BadInput, match=r"^bilevel-maml: --dataset planes has vector inputs: it needs --model mlp "
                                            r"\(or a network of your own\), got 'conv4'$"):
        cli.run([*run, "--dataset", "planes", "--model", "conv4", "--output", str(tmp_path / "x")])

    points.__module__ = "__main__"  # as if a script registered it and called the CLI itself
    register_dataset("scripted-points", points, spec)
    result = cli.run([*run, "--dataset", "scripted-points", "--output", str(tmp_path / "scripted")])
    config = json.loads((tmp_path / "scripted" / "config.json").read_text())
    assert (config["shots"], config["inner_lr"], config["model"], config["plugins"]) == (5, 0.1, "mlp", [])
    assert "dataset 'scripted-points' is defined in the running script (__main__)" in capsys.readouterr().err
    assert result["tasks"] == 5 and "loss" in result


def test_evaluate_scores_a_run_on_other_tasks_of_the_inputs_its_network_takes(tmp_path, registries, capsys):
    """evaluate --dataset / --shots / --query-shots: the run's θ on the test split of another task
    source of the same inputs (cross-domain), or with other shots. A copy of the run's own source
    under another name scores exactly what the run's own tasks score (same θ, same test stream);
    blank images of that shape score exactly chance on every task (there is nothing to tell the
    classes apart); other shots reach the loader; a source of other inputs is refused before it is read."""
    from bilevel_maml.data import DatasetSpec, register_dataset

    asked = []

    def glyphs(ways, samples_per_class):
        asked.append(samples_per_class)

        def sample():
            labels = torch.arange(ways).repeat_interleave(samples_per_class)
            prototypes = torch.randn(ways, 1, 8, 8)
            return prototypes[labels] + 0.3 * torch.randn(len(labels), 1, 8, 8), labels
        return sample

    def blank(ways, samples_per_class):
        return lambda: (torch.zeros(ways * samples_per_class, 1, 8, 8),
                        torch.arange(ways).repeat_interleave(samples_per_class))

    def colour(**given):
        raise AssertionError("a source the run's network cannot take was read")

    small = DatasetSpec(in_channels=1, image_size=8, model="mlp", inner_lr=0.4)
    for name, load in (("glyphs", glyphs), ("glyphs-copy", glyphs), ("blank", blank)):
        register_dataset(name, load, small)
    register_dataset("colour", colour, DatasetSpec(in_channels=3, image_size=8, model="mlp", inner_lr=0.4))
    run = tmp_path / "run"
    cli.run(["train", "--dataset", "glyphs", "--width", "16", "--iterations", "20", "--meta-batch-size", "4",
             "--valid-every", "10", "--valid-tasks", "5", "--test-tasks", "5", "--wandb", "disabled", "--no-progress",
             "--output", str(run)])
    evaluate = ["evaluate", "--output", str(run), "--test-tasks", "30"]
    own = cli.run(evaluate)
    copy = cli.run([*evaluate, "--dataset", "glyphs-copy"])
    assert (copy["accuracy"], copy["loss"]) == (own["accuracy"], own["loss"]) and own["accuracy_ci95"] > 0
    assert (copy["dataset"], own["dataset"], copy["config"]["dataset"]) == ("glyphs-copy", "glyphs", "glyphs")
    assert json.loads((run / "evaluation-glyphs-copy-5w1s-1q.json").read_text())["loss"] == copy["loss"]
    assert json.loads((run / "evaluation.json").read_text())["loss"] == own["loss"]
    assert "maml glyphs-copy 5-way 1-shot (trained on glyphs 5-way 1-shot)" in capsys.readouterr().out

    nothing = cli.run([*evaluate, "--dataset", "blank"])
    assert (nothing["accuracy"], nothing["accuracy_ci95"]) == (pytest.approx(0.2, abs=1e-7), 0.0)  # float32

    more = cli.run([*evaluate, "--shots", "3", "--query-shots", "2"])
    assert asked[-1] == 5 and (more["shots"], more["query_shots"], more["dataset"]) == (3, 2, "glyphs")
    assert (run / "evaluation-glyphs-5w3s-2q.json").is_file()

    with pytest.raises(cli.BadInput, match=r"^bilevel-maml evaluate: --dataset colour is classification of 3×8×8 "
                                            r"images; the run's network was trained on classification of 1×8×8 "
                                            r"images \(glyphs\): evaluate on a dataset of that kind$"):
        cli.run([*evaluate, "--dataset", "colour"])


def test_evaluate_on_other_shots_asks_only_the_split_it_scores(tmp_path, registries):
    """A dataset whose training classes hold 3 examples and whose held-out classes hold 8: evaluate
    --shots 5 scores the split asked for (the test split's blank images: exactly chance), where the
    training split could not have given such tasks; too many shots are refused naming the scored split."""
    from bilevel_maml.data import CharacterImages, DatasetSpec, register_dataset, task_dataset

    def uneven(ways, samples_per_class):
        def split(examples, fill):
            return task_dataset(CharacterImages([fill(examples, 1, 8, 8) for _ in range(6)]), ways=ways,
                                samples_per_class=samples_per_class)
        return {"train": split(3, torch.rand), "validation": split(8, torch.rand), "test": split(8, torch.zeros)}

    register_dataset("uneven", uneven, DatasetSpec(in_channels=1, image_size=8, model="mlp", inner_lr=0.4))
    run = tmp_path / "run"
    cli.run(["train", "--dataset", "uneven", "--width", "8", "--iterations", "2", "--meta-batch-size", "2",
             "--valid-tasks", "2", "--test-tasks", "2", "--wandb", "disabled", "--no-progress", "--output", str(run)])
    evaluate = ["evaluate", "--output", str(run), "--test-tasks", "20", "--shots", "5"]
    test = cli.run(evaluate)
    assert (test["split"], test["shots"], test["tasks"]) == ("test", 5, 20)
    assert (test["accuracy"], test["accuracy_ci95"]) == (pytest.approx(0.2, abs=1e-7), 0.0)
    validation = cli.run([*evaluate, "--split", "validation"])
    assert (validation["split"], validation["shots"]) == ("validation", 5) and validation["accuracy_ci95"] > 0
    for split in ("test", "validation"):
        with pytest.raises(cli.BadInput, match=rf"^bilevel-maml evaluate: the {split} split: shots \+ query_shots = "
                                                rf"8 \+ 1 = 9 is more than the 8 examples of the smallest class; "
                                                rf"choose shots \+ query_shots <= 8$"):
            cli.run(["evaluate", "--output", str(run), "--shots", "8", "--split", split])


@pytest.mark.slow
def test_evaluate_finds_another_dataset_of_the_runs_own_plugin(tmp_path):
    """The name after evaluate --dataset may be registered by a plugin the run's config names (loaded
    after parsing), with no --plugin on evaluate's command line."""
    (tmp_path / "two_sources.py").write_text(textwrap.dedent('''
        from bilevel_maml.data import DatasetSpec, SinusoidTasks, register_dataset

        def near(samples_per_class):
            return SinusoidTasks(points=samples_per_class)

        def far(samples_per_class):
            return SinusoidTasks(points=samples_per_class, amplitude=(4.0, 5.0))

        register_dataset("near", near, DatasetSpec(1, 0, "mlp", 0.1, regression=True, shots=5))
        register_dataset("far", far, DatasetSpec(1, 0, "mlp", 0.1, regression=True, shots=5))
    '''))
    trained = console("train", "--plugin", "two_sources", "--dataset", "near", "--width", "8", "--iterations", "2",
                      "--valid-tasks", "3", "--test-tasks", "3", "--wandb", "disabled", "--output", "run", path=tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = console("evaluate", "--output", "run", "--test-tasks", "5", "--dataset", "far", path=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "far 5-shot regression (trained on near 5-shot regression)" in evaluated.stdout
    assert json.loads((tmp_path / "run" / "evaluation-far-5s-5q.json").read_text())["dataset"] == "far"
