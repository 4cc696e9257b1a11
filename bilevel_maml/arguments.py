"""What ``bilevel-maml`` accepts: its parser (every option, its type and its one-line error),
``--config`` files and ``--plugin`` modules (imported as they are parsed, so the names they register
are known to the options that take them)."""


from __future__ import annotations

import argparse
import math
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from bilevel_maml import distributed
from bilevel_maml.builder import OPTIMIZERS, SAMPLERS
from bilevel_maml.data.sources import BUILT_IN_DATASETS, DATASETS
from bilevel_maml.execution import PRECISIONS
from bilevel_maml.logging import WandbLogger
from bilevel_maml.models import MODELS, known_models
from bilevel_maml.plugins import load_entry_points, load_plugin, unknown_algorithm
from bilevel_maml.problems import ALGORITHMS, BUILT_IN_ALGORITHMS
from bilevel_maml.problems.base import META_LR_SCHEDULES
from bilevel_maml.validation import device_problem

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: the --help text of ``bilevel-maml``
DESCRIPTION = """``bilevel-maml``: train, evaluate, resume and plot meta-learning runs, and benchmark their speed.

    bilevel-maml train --algorithm maml --dataset omniglot-small --ways 5 --shots 1 --output runs/maml
    bilevel-maml evaluate --output runs/maml            # accuracy ± 95% CI over 600 test tasks
    bilevel-maml resume --output runs/maml --iterations 2000
    bilevel-maml plot --output runs/maml                # learning curves: runs/maml/curves.png
    bilevel-maml bench --steps 1 5                      # meta-iteration speed vs learn2learn (and JAX)
    torchrun --nproc_per_node 2 -m bilevel_maml train --meta-batch-size 32 --output runs/maml-2p

A run folder holds ``config.json``, ``checkpoints/last.pt`` and ``checkpoints/best.pt``, the
offline W&B run under ``wandb/``, every meta-iteration's metrics in ``metrics.jsonl`` and
``result.json`` / ``evaluation.json``.
"""


class BadInput(SystemExit):
    """Bad input, found before any work: :func:`bilevel_maml.cli.main` prints the one-line message
    and exits with status 2 (the message is also the exception's text, for callers of
    :func:`bilevel_maml.cli.run`)."""


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line (:class:`BadInput`): argparse's usage block
    would bury the line that matters."""

    def error(self, message):
        raise BadInput(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _number(kind, smallest, description):
    def convert(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
        if kind is float and not math.isfinite(value) or value < smallest:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value

    convert.__name__ = description  # argparse names the type in some messages
    convert.__doc__ = f"""An argparse type: the flag's text as {description}, or argparse's one-line error.

    :param text: the flag's value as typed.
    """
    return convert


class RegisteredName:
    """An argparse type for a name of a registry that plugins add to: lower-cased when parsed and
    checked by :func:`parse` once every plugin is loaded, for the plugins are only known after
    parsing (an abbreviated ``--plug``, a ``--config`` file's ``plugins``)."""

    def __init__(self, known: Callable[[], Iterable[str]], built_in: Iterable[str], unknown: Callable[[str], str],
                 description: str):
        self.known, self.built_in, self.unknown, self.__name__ = known, tuple(built_in), unknown, description

    def __call__(self, text: str) -> str:
        return text.lower()

    def problem(self, name: str) -> str | None:
        """``unknown(name)`` for a name no registry holds, else None."""
        return None if name.lower() in self.known() else self.unknown(name)

    def registered(self) -> list[str]:
        """The names plugins and entry points have added so far."""
        return sorted(set(self.known()) - set(self.built_in))


def unknown_dataset(name: str) -> str:
    return (f"unknown dataset {name!r}; known: {', '.join(DATASETS)}. A task source of your own is registered with "
            f"bilevel_maml.data.register_dataset(name, load, spec) in a module loaded with --plugin MODULE")


def unknown_model(name: str) -> str:
    return (f"unknown model {name!r}; known: {', '.join(known_models())}. A network of your own is registered with "
            f"bilevel_maml.models.register_model(name, factory) in a module loaded with --plugin MODULE")


_algorithm_name = RegisteredName(lambda: ALGORITHMS, BUILT_IN_ALGORITHMS, unknown_algorithm, "an algorithm name")
_model_name = RegisteredName(known_models, MODELS, unknown_model, "a model name")
_dataset_name = RegisteredName(lambda: DATASETS, BUILT_IN_DATASETS, unknown_dataset, "a dataset name")


def _option(text: str) -> tuple[str, object]:
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE, got {text!r}")
    return name.strip().replace("-", "_"), _option_value(value.strip())


_option.__name__ = "NAME=VALUE"


def _option_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


positive_int = _number(int, 1, "an integer >= 1")
non_negative_int = _number(int, 0, "an integer >= 0")
positive_float = _number(float, math.ulp(0.0), "a positive finite number")
non_negative_float = _number(float, 0.0, "a finite number >= 0")


def device_name(text: str) -> str:
    """An argparse type: a device this machine has (``cpu``, ``cuda``, ``cuda:N``).

    :param text: the flag's value as typed.
    """
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


device_name.__name__ = "a device"


class ImportPlugin(argparse._AppendAction):
    """``--plugin MODULE``: collected as ``append`` does, and imported as soon as it is parsed, so a
    later ``--help`` lists what it registers."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        load_plugins([values])


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in ``--help``, as argparse's ArgumentDefaultsHelpFormatter does, except
    where it would print 'default: None' for a default that depends on other options (the help
    says so in words) or 'default: False' for a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if isinstance(action.type, RegisteredName) and action.type.registered():
            text += f"; registered now: {', '.join(action.type.registered())}".replace("%", "%%")
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _training_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--algorithm", type=_algorithm_name, default="maml",
        help=f"{', '.join(BUILT_IN_ALGORITHMS)}, or a variant a --plugin module or a bilevel_maml.algorithms entry "
             f"point registers; an unknown name lists the known ones")
    add("--option", dest="algorithm_options", type=_option, nargs="+", action="extend", default=[],
        metavar="NAME=VALUE",
        help="an option of the algorithm's own classes, e.g. --option multi_step_loss=false first_order_iterations=100 "
             "for maml++, head=... for anil/boil (true/false/none, numbers and words are understood; an unknown "
             "name is refused with the list; default: the classes' own); the run's config.json lists every "
             "option with the value used")
    add("--plugin", dest="plugins", action=ImportPlugin, default=[], metavar="MODULE",
        help="import MODULE (installed, on PYTHONPATH, or MODULE.py in the current folder), which registers "
             "variants, networks or task sources (their names may stand anywhere on the command line, before it or "
             "after, and a --help after it lists them); repeatable; recorded in the run's config, so evaluate and "
             "resume import it too")
    add("--dataset", type=_dataset_name, default="omniglot-small", metavar="DATASET",
        help="omniglot-small: the official small Omniglot background subsets in a local folder; omniglot, "
             "mini-imagenet, tiered-imagenet, cifarfs, fc100: learn2learn's benchmarks; sinusoid: regression; or "
             "a task source a --plugin module registers with bilevel_maml.data.register_dataset")
    add("--data-root", metavar="FOLDER",
        help="folder holding the dataset's files (default: ../shared/data/omniglot-small for omniglot-small, "
             "~/data for the others, $BILEVEL_MAML_DATA/<dataset> when that variable is set, or the variable "
             "itself where its last folder is named as the dataset)")
    add("--download", action="store_true", help="let learn2learn download missing benchmark files (needs internet)")
    add("--ways", type=positive_int, help="classes per task (default: 5; regression tasks have none)")
    add("--shots", type=positive_int, help="support examples per class (default: 1; 10 points for sinusoid)")
    add("--query-shots", type=positive_int, help="query examples per class (default: --shots)")
    add("--inner-steps", type=positive_int,
        help="SGD steps of the inner loop (default: 1, MAML's on Omniglot; its paper took 5 on mini-ImageNet; on "
             "Omniglot 5 for fomaml, imaml, reptile and maml++, which want several smaller steps: 5-way 1-shot, 200 "
             "meta-iterations, MAML's 1 step of 0.4 reached 37.6%%, 28.0%%, 32.6%% and 67.4%% with them, their own "
             "defaults 88.0%%, 73.3%%, 72.9%% and 91.2%%; a registered dataset's DatasetSpec.inner_loops sets its own)")
    add("--eval-inner-steps", type=positive_int,
        help="inner steps of each validation and test task (default: --inner-steps; MAML tests mini-ImageNet with "
             "10 after training with 5); steps past those trained repeat the last one's per-step values")
    add("--inner-lr", type=positive_float,
        help="inner-loop SGD step size (default: 0.4 Omniglot, 0.1 there for fomaml, imaml, reptile and maml++; 0.01 "
             "ImageNet-style; 0.1 sinusoid)")
    add("--meta-lr", type=positive_float, default=1e-3, help="outer learning rate")
    add("--meta-lr-schedule", choices=META_LR_SCHEDULES, default="constant",
        help="constant: --meta-lr throughout; cosine: from --meta-lr along half a cosine toward --min-meta-lr over "
             "--iterations (a resume with more --iterations re-spans it over the new total); maml++ anneals its own "
             "cosine unless --option cosine_lr=false")
    add("--min-meta-lr", type=non_negative_float, metavar="RATE",
        help="where the cosine ends, at most --meta-lr (default: 0; maml++: 1e-5, or --meta-lr where that is lower)")
    add("--meta-batch-size", type=positive_int, default=8,
        help="tasks per meta-update; under torchrun the global count, split evenly over the ranks")
    add("--iterations", type=positive_int, default=200, help="meta-iterations (outer updates)")
    add("--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="outer optimizer")
    add("--gradient-clipping", type=non_negative_float, default=0.0, metavar="NORM",
        help="scale the meta-gradient (θ's and any meta-learned step sizes' together) to this global norm "
             "where it is larger, before each outer step; 0 turns clipping off")
    add("--model", type=_model_name, metavar="MODEL",
        help="backbone: conv4 (Vinyals et al.'s max-pool network), conv4-strided (Finn et al.'s stride-2 Omniglot "
             "network), resnet12, mlp, or a network a --plugin module registers with "
             "bilevel_maml.models.register_model (default: conv4; mlp for sinusoid)")
    add("--width", type=positive_int,
        help="conv4 filters, resnet12 first-stage channels, mlp hidden units (default: 64, 64, 40)")
    add("--lam", type=positive_float,
        help="iMAML proximal strength λ (default: 1.0; 0.5 on Omniglot, where iMAML wants its proximal inner problem "
             "nearly solved: 5 inner steps of --inner-lr 0.1 with λ = 0.5 reached 73.3%% where --inner-lr 0.4 and "
             "λ = 1.0 reached 37.0%%)")
    add("--cg-iterations", type=positive_int, help="iMAML conjugate-gradient iterations (default: 5)")
    add("--vectorize", action=argparse.BooleanOptionalAction, default=True,
        help="adapt the meta-batch at once with torch.func.vmap, or task by task (same meta-gradient); "
             "evaluation follows")
    add("--sampler", choices=SAMPLERS, default="auto",
        help="device: each split held on --device and whole meta-batches drawn there (sinusoids too); "
             "learn2learn: task by task on the CPU; auto: device where the split allows it and fits a quarter "
             "of the device's memory, else learn2learn with a one-line warning (the same task distribution "
             "either way)")
    add("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
        help="on CUDA, capture the meta-iteration as a CUDA graph and replay it (default: wherever it works, "
             "else a one-line warning says why and the run is eager; refused on other devices)")
    add("--precision", choices=PRECISIONS,
        help="fp32: no TF32 anywhere; tf32: TF32 convolutions and matmuls (CUDA); bf16: autocast (CUDA) "
             "(default: tf32 on CUDA, fp32 elsewhere)")
    add("--seed", type=non_negative_int, default=0, help="seeds θ's initialization and every task stream")
    add("--device", default="cpu", help="cpu, cuda, cuda:1, ... (cuda fails clearly where CUDA is absent)")
    add("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of θ and the data")
    add("--valid-every", type=positive_int, default=50, help="validate every this many meta-iterations")
    add("--valid-tasks", type=positive_int, default=100, help="validation tasks per validation")
    add("--test-tasks", type=positive_int, default=600, help="tasks in the final test report")
    add("--per-step", action="store_true",
        help="the final test also reports the mean ± 95%% CI after 0, 1, ..., --eval-inner-steps inner steps "
             "(per_step in result.json)")
    add("--checkpoint-every", type=positive_int, default=50,
        help="write checkpoints/last.pt every N meta-iterations (and at the end or a stop; the one before is kept "
             "as previous.pt); best.pt at every validation improvement")
    add("--output", metavar="FOLDER",
        help="run folder; train refuses one that already holds a run "
             "(default: runs/<algorithm>-<dataset>-<ways>w<shots>s-seed<seed>, and -<W&B run id> under a W&B "
             "sweep agent)")
    add("--resume-if-exists", action="store_true",
        help="if --output already holds this run (the same settings; --iterations may be larger), continue it as "
             "`resume` would, so a requeued cluster job can run the same command again")
    _distributed_options(parser)
    _logging_options(parser)


def _distributed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dist-timeout", type=positive_float, default=distributed.DEFAULT_TIMEOUT_SECONDS,
                        metavar="SECONDS",
                        help="under torchrun: seconds a rank waits for the others before stopping with an error")


#: the W&B settings a run keeps (in its config) and ``train`` defaults to; ``resume`` continues with the run's
RUN_LOGGING_DEFAULTS = {"wandb": "offline", "wandb_project": "bilevel-maml", "run_name": None, "group": None, "tags": []}


def _logging_options(parser: argparse.ArgumentParser, existing_run: bool = False) -> None:
    """The W&B and progress options; for an ``existing_run`` (resume) the W&B ones default to the run's."""
    add = parser.add_argument
    default = {name: None for name in RUN_LOGGING_DEFAULTS} if existing_run else RUN_LOGGING_DEFAULTS
    run_s = " (default: the run's)" if existing_run else ""
    add("--wandb", choices=WandbLogger.MODES, default=default["wandb"],
        help=f"W&B mode: offline needs no account (sync later with `wandb sync`), online uses your own key{run_s}")
    add("--wandb-project", default=default["wandb_project"], help=f"W&B project{run_s}")
    add("--run-name", help="W&B run name (default: " + ("the run's" if existing_run else "the run folder's name") + ")")
    add("--group", help=f"W&B group{run_s}")
    add("--tags", nargs="*", default=default["tags"], help=f"W&B tags{run_s}")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show a progress bar: loss, accuracy, tasks/s, validation accuracy, ETA "
             "(default: only when stderr is a terminal)")


def _existing_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that rebuild a run from its config (evaluate, resume)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the run's device)")
    parser.add_argument("--plugin", dest="plugins", action=ImportPlugin, default=[], metavar="MODULE",
                        help="import MODULE first (besides the plugins the run's config names); repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The ``bilevel-maml`` argument parser (the CLI page of the docs is generated from it)."""
    parser = OneLineParser(prog="bilevel-maml", description=DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, summary, description):
        return commands.add_parser(name, help=summary.replace("%", "%%"), description=textwrap.fill(description, 96),
                                   formatter_class=DefaultsHelpFormatter)

    train = command("train", "meta-train, then report test accuracy",
                    "Meta-train, validate, checkpoint and log to W&B, then report test accuracy (or MSE) ± 95% CI "
                    "with the best-validation θ and write result.json; every meta-iteration's metrics go to the "
                    "run folder's metrics.jsonl (drawn by `bilevel-maml plot`).")
    train.add_argument("--config", metavar="FILE",
                       help="YAML (.yaml/.yml) or TOML (.toml) file of these options (meta-batch-size or "
                            "meta_batch_size); flags on the command line override it; unknown keys are an error; "
                            "--option's key is algorithm_options (a table or a list of name=value), --plugin's "
                            "is plugins")
    _training_options(train)

    evaluate = command("evaluate", "accuracy ± 95% CI of a checkpoint on test tasks",
                       "Load a run's best.pt (else last.pt, or --checkpoint FILE), report the mean ± 95% CI over "
                       "--test-tasks test tasks and write evaluation.json (or --result FILE). The tasks are the "
                       "run's unless --dataset, --shots or --query-shots say otherwise: another dataset of the same "
                       "inputs (cross-domain), more or fewer examples per class (written to "
                       "evaluation-<dataset>-<ways>w<shots>s-<query shots>q.json). --split validation scores the "
                       "validation split instead (evaluation-validation*.json), for choosing among checkpoints or "
                       "settings without looking at the test split.")
    evaluate.add_argument("--output", metavar="FOLDER", help="run folder (uses checkpoints/best.pt, else last.pt)")
    evaluate.add_argument("--checkpoint", metavar="FILE", help="checkpoint file (instead of --output)")
    evaluate.add_argument("--test-tasks", type=positive_int, default=600, help="tasks to score (of --split)")
    evaluate.add_argument("--split", choices=("test", "validation"), default="test",
                          help="which split's tasks: test (the report), or validation (to choose a checkpoint or a "
                               "setting by)")
    evaluate.add_argument("--eval-inner-steps", type=positive_int,
                          help="inner steps of each task (default: the run's)")
    evaluate.add_argument("--per-step", action="store_true",
                          help="also report the mean ± 95%% CI after 0, 1, ..., --eval-inner-steps inner steps "
                               "(per_step in the JSON file)")
    evaluate.add_argument("--result", metavar="FILE",
                          help="JSON file to write (default: <run folder>/evaluation.json, or the name above for "
                               "other tasks than the run's)")
    evaluate.add_argument("--dataset", type=str.lower, metavar="DATASET",  # checked once the run's plugins are in
                          help="another dataset whose inputs the run's network takes (the same image "
                               "channels and size; classification or regression as the run) (default: the run's)")
    evaluate.add_argument("--data-root", metavar="FOLDER",
                          help="folder holding --dataset's files (default: the run's for its own dataset, else "
                               "--dataset's default)")
    evaluate.add_argument("--download", action="store_true",
                          help="let learn2learn download missing benchmark files (needs internet)")
    evaluate.add_argument("--shots", type=positive_int,
                          help="support examples per class of each task (default: the run's)")
    evaluate.add_argument("--query-shots", type=positive_int,
                          help="query examples per class of each task (default: the run's)")
    evaluate.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                          help="show a progress bar over the tasks (default: only when stderr is a terminal)")
    evaluate.add_argument("--wandb", choices=WandbLogger.MODES,
                          help="W&B mode for the scores, which go to the summary of the run's W&B run as "
                               "<file name>/accuracy and so on (evaluation/accuracy, "
                               "evaluation-validation/accuracy, ...) (default: the run's; disabled: JSON only)")
    _existing_run_options(evaluate)

    resume = command("resume", "continue an interrupted or finished run",
                     "Continue a stopped or killed run from its newest intact checkpoint (last.pt, else "
                     "previous.pt, else best.pt), in the same W&B run (the run's W&B settings unless flags change them); "
                     "--iterations N extends it. On a finished "
                     "run (trained and tested) it says so, changes nothing and exits 0.")
    resume.add_argument("--output", required=True, metavar="FOLDER", help="run folder holding checkpoints/last.pt")
    resume.add_argument("--iterations", type=positive_int, help="new total of meta-iterations (default: the run's)")
    _existing_run_options(resume)
    _distributed_options(resume)
    _logging_options(resume, existing_run=True)

    plot = command("plot", "learning curves of a run, or several runs compared, as a PNG",
                   "Draw the run's learning curves (training loss and accuracy per meta-iteration, validation mean "
                   "with its 95% band, the test point; the test after 0, 1, ... inner steps where train or evaluate "
                   "ran with --per-step) from its metrics.jsonl, else its offline W&B run; needs no W&B account. "
                   "Given several runs, draw them in one figure, a colour each, and print a Markdown table of their "
                   "test and best validation results.")
    plot.add_argument("--output", required=True, nargs="+", metavar="FOLDER",
                      help="run folder; several to compare them")
    plot.add_argument("--file", metavar="PNG",
                      help="PNG to write (default: <run folder>/curves.png; for several runs, comparison.png in "
                           "their common parent folder)")
    plot.add_argument("--dpi", type=positive_int, default=120,
                      help="dots per inch of the PNG (the figure is 4 inches high)")

    command("bench", "meta-iteration, end-to-end and evaluation speed against learn2learn and JAX",
            "The speed benchmark of a source checkout (benchmarks/meta_iteration.py); its options: "
            "bilevel-maml bench --help.").add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                                                       help="the benchmark's options")
    return parser


def _config_file_arguments(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """Turn a YAML/TOML file into command-line arguments placed before the real ones, so that
    argparse checks their values and explicit flags win."""
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"bilevel-maml: --config file {path!r} does not exist")
    if file.suffix not in (".toml", ".yaml", ".yml"):
        raise BadInput(f"bilevel-maml: --config must be a .yaml, .yml or .toml file, got {path!r}")
    try:
        text = file.read_text()
        if file.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # tomllib/yaml syntax errors, undecodable bytes, unreadable files
        where = " ".join(str(error).split())
        raise BadInput(f"bilevel-maml: --config {path} is not valid {file.suffix[1:].upper()}: {where}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise BadInput(f"bilevel-maml: --config {path} must map option names to values, got a {type(values).__name__}")
    known = {a.dest: a for a in parser._actions if a.option_strings}
    plugins = values.get("plugins", [])
    if isinstance(plugins, str) or isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
        load_plugins([plugins] if isinstance(plugins, str) else plugins)  # the file's other values may name theirs
    arguments: list[str] = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            allowed = ", ".join(sorted(k for k in known if k not in ("config", "help")))
            raise BadInput(f"bilevel-maml: unknown option {key!r} in {path}; allowed: {allowed}")
        action = known[dest]
        flag = action.option_strings[0]
        if dest == "algorithm_options" and isinstance(value, dict):  # a table: {name = value, ...}
            value = [f"{name}={'none' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                     for name, v in value.items()]
        repeatable = isinstance(action, argparse._AppendAction)
        takes_list = action.nargs in ("*", "+") or repeatable
        if isinstance(value, (dict, list)) and not (takes_list and isinstance(value, list)) or (
                isinstance(value, bool) and action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)):
            raise BadInput(f"bilevel-maml: {key} = {value!r} in {path} must be a single value"
                           + (f" ({action.type.__name__})" if action.type is not None else ""))
        if action.nargs == 0 and not isinstance(value, bool):  # an on/off flag (--per-step, --download)
            raise BadInput(f"bilevel-maml: {key} = {value!r} in {path} must be true or false")
        for item in value if isinstance(value, list) else [value]:
            if action.type is not None and not isinstance(item, bool) and item is not None:
                try:
                    action.type(str(item))
                except argparse.ArgumentTypeError as error:
                    raise BadInput(f"bilevel-maml: {key} = {item!r} in {path}: {error}") from None
                if isinstance(action.type, RegisteredName) and (problem := action.type.problem(str(item))):
                    raise BadInput(f"bilevel-maml: {key} = {item!r} in {path}: {problem}")
            if action.choices is not None and item is not None and str(item) not in action.choices:
                raise BadInput(f"bilevel-maml: {key} = {item!r} in {path}: choose one of "
                               f"{', '.join(map(str, action.choices))}")
        if isinstance(value, bool):
            if isinstance(action, argparse.BooleanOptionalAction):
                arguments.append(flag if value else flag.replace("--", "--no-", 1))
            elif value:
                arguments.append(flag)
        elif isinstance(value, list) and repeatable:
            for item in value:
                arguments += [flag, str(item)]
        elif isinstance(value, list):
            arguments += [flag, *map(str, value)]
        elif value is not None:
            arguments += [flag, str(value)]
    return arguments


def load_plugins(modules, whose: str = "--plugin", found_in: dict | None = None) -> None:
    """Import each of ``modules`` (after the entry points), or one line naming the first that fails.

    :param whose: where the names came from, for that line (``"the run's --plugin"``: its config).
    :param found_in: the folder each module was imported from when the run was made, looked in last.
    """
    load_entry_points()
    for module in modules:
        try:
            load_plugin(module, (found_in or {}).get(module))
        except ValueError as error:
            raise BadInput(f"bilevel-maml: {whose}: {error}") from None


def plugins_named(argv: list[str]) -> list[str]:
    """The modules of ``--plugin`` options in ``argv``, in the spellings argparse takes (``--plugin M``,
    ``--plugin=M``, abbreviated to ``--plug``)."""
    modules = []
    for at, word in enumerate(argv):
        flag, equals, value = word.partition("=")
        if len(flag) > 3 and "--plugin".startswith(flag):
            modules.append(value if equals else argv[at + 1] if at + 1 < len(argv) else "")
    return [module for module in modules if module and not module.startswith("-")]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options
        return argparse.Namespace(command="bench", bench_args=argv[1:])
    load_entry_points()
    if "-h" in argv or "--help" in argv:  # argparse prints help the moment it reads the flag
        load_plugins(plugins_named(argv))  # so that it lists what those after the flag register too
    parser = build_parser()
    args = parser.parse_args(argv)  # imports each --plugin module as it comes
    command = parser._subparsers._group_actions[0].choices[args.command]
    if args.command == "train" and args.config:
        from_file = _config_file_arguments(args.config, command)  # loads the file's plugins first
        args = parser.parse_args(["train", *from_file, *argv[1:]])
    for action in command._actions:  # now that every plugin that registers a name is loaded
        name = getattr(args, action.dest, None)
        if isinstance(action.type, RegisteredName) and name is not None and (problem := action.type.problem(name)):
            command.error(f"argument {'/'.join(action.option_strings)}: {problem}")
    return args
