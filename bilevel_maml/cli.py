"""``bilevel-maml``: train, evaluate, resume and plot meta-learning runs, and benchmark their speed.

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

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from bilevel_maml import distributed
from bilevel_maml.allocator import keep_freed_memory
from bilevel_maml.builder import OPTIMIZERS, SAMPLERS, build_engine
from bilevel_maml.checkpoint import CHECKPOINT_FILES, Checkpointer, CheckpointWriteError, load_checkpoint, newest_intact
from bilevel_maml._factories import outside_package
from bilevel_maml.data.sources import BUILT_IN_DATASETS, DATASETS, load_tasksets
from bilevel_maml.engine import MetaEngine, NonFiniteError
from bilevel_maml.execution import PRECISIONS, check_precision
from bilevel_maml.history import METRICS_FILE, RUN_PLACEMENT_KEYS, MetricsFile, plain_json
from bilevel_maml.logging import WandbLogger
from bilevel_maml.models import MODELS, REGISTERED_MODELS, build_model, known_models
from bilevel_maml.plugins import defining_modules, load_entry_points, load_plugin, unknown_algorithm
from bilevel_maml.problems import ALGORITHMS, BUILT_IN_ALGORITHMS, options_in_use
from bilevel_maml.problems.base import META_LR_SCHEDULES
from bilevel_maml.progress import ProgressBar
from bilevel_maml.runlock import RunFolderInUse, RunLock
from bilevel_maml.stopping import GracefulStop, StoppedAtOnce, exit_status
from bilevel_maml.validation import device_problem

DTYPES = {"float32": torch.float32, "float64": torch.float64}
RUN_FILES = ("config.json", "checkpoints/last.pt")


class BadInput(SystemExit):
    """Bad input, found before any work: :func:`main` prints the one-line message and exits with
    status 2 (the message is also the exception's text, for callers of :func:`run`)."""


#: what the library raises for bad input, with a message naming the value and what is allowed
BAD_INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError)


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
    """An argparse type: a device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
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
        help="import MODULE, which registers variants, networks or task sources (their names may stand anywhere "
             "on the command line, before it or after, and a --help after it lists them); repeatable; recorded in "
             "the run's config, so evaluate and resume import it too")
    add("--dataset", type=_dataset_name, default="omniglot-small", metavar="DATASET",
        help="omniglot-small: the official small Omniglot background subsets in a local folder; omniglot, "
             "mini-imagenet, tiered-imagenet, cifarfs, fc100: learn2learn's benchmarks; sinusoid: regression; or "
             "a task source a --plugin module registers with bilevel_maml.data.register_dataset")
    add("--data-root", metavar="FOLDER",
        help="folder holding the dataset's files (default: ../shared/data/omniglot-small for omniglot-small, "
             "~/data for the others, $BILEVEL_MAML_DATA/<dataset> when that variable is set)")
    add("--download", action="store_true", help="let learn2learn download missing benchmark files (needs internet)")
    add("--ways", type=positive_int, default=5, help="classes per task")
    add("--shots", type=positive_int, help="support examples per class (default: 1; 10 points for sinusoid)")
    add("--query-shots", type=positive_int, help="query examples per class (default: --shots)")
    add("--inner-steps", type=positive_int, default=1, help="SGD steps of the inner loop")
    add("--eval-inner-steps", type=positive_int,
        help="inner steps of each validation and test task (default: --inner-steps; MAML tests mini-ImageNet with "
             "10 after training with 5); steps past those trained repeat the last one's per-step values")
    add("--inner-lr", type=positive_float,
        help="inner-loop SGD step size (default: 0.4 Omniglot, 0.01 ImageNet-style, 0.1 sinusoid)")
    add("--meta-lr", type=positive_float, default=1e-3, help="outer learning rate")
    add("--meta-lr-schedule", choices=META_LR_SCHEDULES, default="constant",
        help="constant: --meta-lr throughout; cosine: from --meta-lr along half a cosine toward --min-meta-lr over "
             "--iterations (a resume with more --iterations re-spans it over the new total); maml++ anneals its own "
             "cosine unless --option cosine_lr=false")
    add("--min-meta-lr", type=non_negative_float, metavar="RATE",
        help="where the cosine ends (default: 0; maml++: 1e-5)")
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
    add("--lam", type=positive_float, default=1.0,
        help="iMAML proximal strength λ (iMAML wants its proximal inner problem nearly solved: on 5-way 1-shot "
             "Omniglot, 5 inner steps of --inner-lr 0.1 with --lam 0.5 reached 76%% where 0.4 and 1.0 reached 37%%)")
    add("--cg-iterations", type=positive_int, default=5, help="iMAML conjugate-gradient iterations")
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
             "(default: runs/<algorithm>-<dataset>-<ways>w<shots>s-seed<seed>)")
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
    parser = OneLineParser(prog="bilevel-maml", description=__doc__, formatter_class=DefaultsHelpFormatter)
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
                       "evaluation-<dataset>-<ways>w<shots>s-<query shots>q.json).")
    evaluate.add_argument("--output", metavar="FOLDER", help="run folder (uses checkpoints/best.pt, else last.pt)")
    evaluate.add_argument("--checkpoint", metavar="FILE", help="checkpoint file (instead of --output)")
    evaluate.add_argument("--test-tasks", type=positive_int, default=600, help="test tasks to score")
    evaluate.add_argument("--eval-inner-steps", type=positive_int,
                          help="inner steps of each test task (default: the run's)")
    evaluate.add_argument("--per-step", action="store_true",
                          help="also report the mean ± 95%% CI after 0, 1, ..., --eval-inner-steps inner steps "
                               "(per_step in the JSON file)")
    evaluate.add_argument("--result", metavar="FILE",
                          help="JSON file to write (default: <run folder>/evaluation.json, or the name above for "
                               "other tasks than the run's)")
    evaluate.add_argument("--dataset", type=_dataset_name, metavar="DATASET",
                          help="test split of another dataset whose inputs the run's network takes (the same image "
                               "channels and size; classification or regression as the run) (default: the run's)")
    evaluate.add_argument("--data-root", metavar="FOLDER",
                          help="folder holding --dataset's files (default: the run's for its own dataset, else "
                               "--dataset's default)")
    evaluate.add_argument("--download", action="store_true",
                          help="let learn2learn download missing benchmark files (needs internet)")
    evaluate.add_argument("--shots", type=positive_int,
                          help="support examples per class of each test task (default: the run's)")
    evaluate.add_argument("--query-shots", type=positive_int,
                          help="query examples per class of each test task (default: the run's)")
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


def load_plugins(modules) -> None:
    load_entry_points()
    for module in modules:
        try:
            load_plugin(module)
        except ValueError as error:
            raise BadInput(f"bilevel-maml: --plugin: {error}") from None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options
        return argparse.Namespace(command="bench", bench_args=argv[1:])
    load_entry_points()
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


def _device(name: str) -> torch.device:
    """``--device`` of a command or a run's config (which the parser's type did not see)."""
    try:
        return torch.device(device_name(name))
    except argparse.ArgumentTypeError as error:
        raise BadInput(f"bilevel-maml: invalid --device: {error}") from None


def _join_process_group(device: torch.device, timeout: float) -> torch.device:
    """Under torchrun, join the process group (gloo on CPU, NCCL on CUDA); else keep ``device``."""
    if not distributed.launched_distributed():
        return device
    try:
        return distributed.init_from_environment(device, timeout)
    except ValueError as error:
        raise BadInput(f"bilevel-maml: {error}") from None


def _run_config(args: argparse.Namespace) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config["world_size"] = distributed.world()[1]
    spec = DATASETS[config["dataset"]]
    config["model"] = config["model"] or spec.model
    defining = {f"algorithm {config['algorithm']!r}": defining_modules(config["algorithm"]),
                f"model {config['model']!r}": outside_package(REGISTERED_MODELS.get(config["model"])),
                f"dataset {config['dataset']!r}": outside_package(spec.load)}
    config["plugins"] = list(dict.fromkeys([*config["plugins"], *(m for modules in defining.values() for m in modules)]))
    if "__main__" in config["plugins"]:
        config["plugins"].remove("__main__")
        in_script = [what for what, modules in defining.items() if "__main__" in modules]
        several = len(in_script) > 1
        print(f"bilevel-maml: warning: {', '.join(in_script[:-1]) + ' and ' if several else ''}{in_script[-1]} "
              f"{'are' if several else 'is'} defined in the running script (__main__), which `bilevel-maml evaluate` "
              f"and `resume` cannot import; define {'them' if several else 'it'} in a module and pass --plugin MODULE",
              file=sys.stderr, flush=True)
    try:  # every option of the algorithm, with the value this run uses (None: the class's own default rule)
        config["algorithm_options"] = options_in_use(config["algorithm"], dict(config["algorithm_options"]))
    except ValueError as error:
        raise BadInput(f"bilevel-maml: --option: {error}") from None
    own_cosine = config["algorithm_options"].get("cosine_lr")  # MAML++'s, on by default
    if config["meta_lr_schedule"] == "cosine" and own_cosine is False:
        raise BadInput("bilevel-maml: --meta-lr-schedule cosine and --option cosine_lr=false disagree; drop one")
    if config["min_meta_lr"] is not None and config["meta_lr_schedule"] != "cosine" and own_cosine is not True:
        raise BadInput(f"bilevel-maml: --min-meta-lr {config['min_meta_lr']} is where a cosine schedule ends, and this "
                       f"run's rate is constant; add --meta-lr-schedule cosine")
    for name in ("lam", "cg_iterations"):  # iMAML's, set by their own flags
        config["algorithm_options"].pop(name, None)
    config["shots"] = config["shots"] or spec.shots
    config["query_shots"] = config["query_shots"] or config["shots"]
    config["eval_inner_steps"] = config["eval_inner_steps"] or config["inner_steps"]
    config["inner_lr"] = config["inner_lr"] if config["inner_lr"] is not None else spec.inner_lr
    try:
        config["precision"] = check_precision(config["precision"], config["device"], DTYPES[config["dtype"]])
    except ValueError as error:
        raise BadInput(f"bilevel-maml: --precision: {error}") from None
    if config["cuda_graph"] and torch.device(config["device"]).type != "cuda":
        raise BadInput(f"bilevel-maml: --cuda-graph needs a CUDA device, got --device {config['device']}; "
                       f"drop the flag (CUDA runs use graphs wherever they work)")
    if config["output"] is None:
        c = config
        config["output"] = f"runs/{c['algorithm']}-{c['dataset']}-{c['ways']}w{c['shots']}s-seed{c['seed']}"
    _check_writable_folder("--output", Path(config["output"]))
    if config["data_root"] is not None and Path(config["data_root"]).exists() and not Path(config["data_root"]).is_dir():
        raise BadInput(f"bilevel-maml: --data-root {config['data_root']!r} is a file; pass the folder holding "
                       f"the dataset's files")
    return config


def _check_writable_folder(flag: str, folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"bilevel-maml: {flag} {str(folder)!r} is a file; pass a folder (it is created if missing)")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"bilevel-maml: {flag} {str(folder)!r} cannot be written here ({existing} is not a "
                       f"writable folder)")


def _registered_model(config: dict, spec, outputs: int) -> torch.nn.Module:
    """A network of the user's own (register_model), given what the dataset's tasks look like."""
    channels, size = (None, None) if spec.vector_inputs else (spec.in_channels, spec.image_size)
    try:
        return build_model(config["model"], outputs, in_channels=channels, image_size=size, width=config["width"],
                           in_features=spec.in_features)
    except Exception as error:  # the factory is the user's code: its failure is one line naming it
        raise BadInput(f"bilevel-maml: --model {config['model']}: {type(error).__name__}: "
                       f"{' '.join(str(error).split())}") from None


def build_from_config(config: dict, device: torch.device) -> MetaEngine:
    """The engine a run's configuration describes (same path for train, evaluate and resume)."""
    load_plugins(config.get("plugins", []))
    if config["algorithm"] not in ALGORITHMS:
        raise BadInput(f"bilevel-maml: the run's {unknown_algorithm(config['algorithm'])}")
    if config["dataset"] not in DATASETS:
        raise BadInput(f"bilevel-maml: the run's {unknown_dataset(config['dataset'])}")
    spec = DATASETS[config["dataset"]]
    if config["model"] not in known_models():
        raise BadInput(f"bilevel-maml: the run's {unknown_model(config['model'])}")
    if spec.vector_inputs and config["model"] in MODELS and config["model"] != "mlp":
        raise BadInput(f"bilevel-maml: --dataset {config['dataset']} has vector inputs: it needs --model mlp (or a "
                       f"network of your own), got {config['model']!r}")
    try:
        tasksets = load_tasksets(config["dataset"], config["data_root"], config["ways"], config["shots"],
                                 config["query_shots"], seed=config["seed"], download=config["download"])
    except Exception as error:
        if spec.load is None:
            raise  # the built-in loaders' own errors are one line already (missing files, say)
        raise BadInput(f"bilevel-maml: --dataset {config['dataset']}: {type(error).__name__}: "
                       f"{' '.join(str(error).split())}") from None
    torch.manual_seed(config["seed"])
    outputs = 1 if spec.regression else config["ways"]
    if config["model"] in REGISTERED_MODELS:
        model = _registered_model(config, spec, outputs)
    elif spec.vector_inputs:
        model = build_model("mlp", outputs, width=config["width"], in_features=spec.in_features)
    elif config["model"] == "mlp":
        model = torch.nn.Sequential(torch.nn.Flatten(), build_model("mlp", outputs, width=config["width"],
                                                                    in_features=spec.in_features))
    else:
        model = build_model(config["model"], outputs, in_channels=spec.in_channels, image_size=spec.image_size,
                            width=config["width"])
    return build_engine(
        config["algorithm"], model, tasksets, ways=config["ways"], shots=config["shots"],
        query_shots=config["query_shots"], inner_steps=config["inner_steps"], inner_lr=config["inner_lr"],
        meta_lr=config["meta_lr"], meta_batch_size=config["meta_batch_size"],
        meta_iterations=config["iterations"], optimizer=config["optimizer"],
        gradient_clipping=config.get("gradient_clipping", 0.0),
        # constant: the algorithm's own (MAML++ anneals its own cosine unless cosine_lr=false)
        meta_lr_schedule=None if config.get("meta_lr_schedule", "constant") == "constant" else config["meta_lr_schedule"],
        min_meta_lr=config.get("min_meta_lr"), regression=spec.regression,
        lam=config["lam"], cg_iterations=config["cg_iterations"], valid_step=config["valid_every"],
        valid_tasks=config["valid_tasks"], eval_inner_steps=config.get("eval_inner_steps"), seed=config["seed"],
        device=device,
        dtype=DTYPES[config["dtype"]], vectorize=config.get("vectorize", True),
        # runs written before these options existed drew their tasks through learn2learn, eagerly
        sampler=config.get("sampler", "learn2learn"),
        cuda_graph=config.get("cuda_graph", False) if device.type == "cuda" else False,
        precision=config.get("precision") if device.type == torch.device(config["device"]).type else None,
        algorithm_options=config.get("algorithm_options"),
    )


def _task_kind(config: dict) -> str:
    if DATASETS[config["dataset"]].regression:
        return f"{config['shots']}-shot regression"
    return f"{config['ways']}-way {config['shots']}-shot"


def _inner_steps(count: int) -> str:
    return f"{count} inner step{'s' if count != 1 else ''}"


def _evaluation_steps(engine: MetaEngine) -> str:
    """How many inner steps held-out tasks took, where that differs from training."""
    steps = engine.eval_inner_steps
    return "" if steps == engine.inner_steps else f", adapted with {_inner_steps(steps)}"


def _print_per_step(result: dict) -> None:
    """An evaluation's ``per_step`` lists, if it has them, as a line per number of steps taken."""
    curve = result.get("per_step", {})
    for steps, values in enumerate(zip(*curve.values())):
        print(f"  after {_inner_steps(steps)}: {_format(dict(zip(curve, values)))}", flush=True)


def _format(stats: dict) -> str:
    if "accuracy" in stats:
        mean, half, unit, digits = 100 * stats["accuracy"], 100 * stats["accuracy_ci95"], "%", 2
    else:
        mean, half, unit, digits = stats["loss"], stats["loss_ci95"], "", 4
    spread = f" ± {half:.{digits}f}{unit}" if math.isfinite(half) else " ± n/a"
    return f"{'' if unit else 'MSE '}{mean:.{digits}f}{unit}{spread}"


def _train(engine: MetaEngine, config: dict, output: Path, args: argparse.Namespace) -> dict:
    """Run (or continue) meta-training with progress, checkpoints and W&B, then test. Under
    torch.distributed every rank trains and takes part in checkpoints; rank 0 alone shows progress,
    logs to W&B, writes files and runs the final test."""
    main = engine.rank == 0
    checkpointer = Checkpointer(output / "checkpoints", every=config["checkpoint_every"], config=config)
    engine.callbacks += [ProgressBar(args.progress), MetricsFile(output / METRICS_FILE), checkpointer] if main \
        else [checkpointer]
    logger = None
    run_name = args.run_name or output.name
    if args.wandb != "disabled" and main:
        logger = WandbLogger(project=args.wandb_project, name=run_name, group=args.group,
                             tags=args.tags, config=config, mode=args.wandb, dir=str(output),
                             id=config.get("wandb_id"))
        engine.logger = logger
    if main:
        ranks = f" on {engine.world_size} processes" if engine.world_size > 1 else ""
        print(f"{config['algorithm']} on {config['dataset']}: {_task_kind(config)}, "
              f"{config['iterations']} meta-iteration{'s' if config['iterations'] != 1 else ''} of "
              f"{config['meta_batch_size']} task{'s' if config['meta_batch_size'] != 1 else ''}{ranks} "
              f"(from iteration {engine.meta_iteration}), run folder {output}", flush=True)
    try:
        with GracefulStop(engine):
            engine.run()
    except StoppedAtOnce as stop:
        kept = checkpointer.last or checkpointer.best
        if main:
            print(f"bilevel-maml: {stop}; " + (f"the last checkpoint written is {kept}: continue with "
                  f"`{_resume_command(engine, output)}`" if kept else "no checkpoint had been written yet"),
                  file=sys.stderr, flush=True)
        raise SystemExit(exit_status(stop.signum)) from None
    except distributed.RankFailure:
        if logger is not None:
            logger.finish()
        raise
    except NonFiniteError as error:
        kept = checkpointer.last or checkpointer.best
        message = f"bilevel-maml: stopped: {error}. "
        message += f"Last good checkpoint: {kept}" if kept else "No checkpoint had been written yet."
        if logger is not None:
            logger.finish()
        raise SystemExit(message) from None
    if engine.stop_signal is not None:
        if logger is not None:
            logger.finish()
        if main:
            print(f"bilevel-maml: stopped by {signal.Signals(engine.stop_signal).name} after meta-iteration "
                  f"{engine.meta_iteration} of {config['iterations']}; checkpoint written to {checkpointer.last}; "
                  f"continue with `{_resume_command(engine, output)}`", file=sys.stderr, flush=True)
        raise SystemExit(exit_status(engine.stop_signal))
    if not main:
        return {"rank": engine.rank, "iteration": engine.meta_iteration}
    if checkpointer.best is not None and engine.best_valid is not None:
        engine.load_parameters(load_checkpoint(checkpointer.best)["engine"])
        entry, trained_at = "best", engine.best_valid["iteration"]
    else:
        entry, trained_at = "last", engine.meta_iteration
    result = engine.test(config["test_tasks"], per_step=config.get("per_step", False))
    result.update(checkpoint=entry, iteration=trained_at, config=config)
    atomic_save_json(output / "result.json", result)
    print(f"held-out test, {_task_kind(config)} ({entry} θ, iteration {trained_at}): {_format(result)} "
          f"(95% CI over {result['tasks']} tasks{_evaluation_steps(engine)})", flush=True)
    _print_per_step(result)
    if logger is not None:
        if checkpointer.best is not None:
            logger.log_artifact(checkpointer.best, name=f"{run_name}-best", metadata=engine.best_valid)
        run_dir = logger.run_dir
        logger.finish()
        if run_dir:
            print(f"W&B {args.wandb} run: {run_dir}", flush=True)
    return result


def _resume_command(engine: MetaEngine, output: Path) -> str:
    if engine.world_size > 1:
        return f"torchrun --nproc_per_node {engine.world_size} -m bilevel_maml resume --output {output}"
    return f"bilevel-maml resume --output {output}"


def atomic_save_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(plain_json(data), indent=2, default=str, allow_nan=False))
    partial.replace(path)


def _holds_run(output: Path) -> bool:
    return any((output / "checkpoints" / name).exists() for name in CHECKPOINT_FILES)


def _refuse_existing_run(output: Path) -> None:
    if _holds_run(output):
        existing = [f for f in RUN_FILES if (output / f).exists()] or ["checkpoints"]
        raise BadInput(f"bilevel-maml: {output} already holds a run ({', '.join(existing)}); continue it "
                       f"with `bilevel-maml resume --output {output}` or choose another --output")


def _lock(output: Path, engine: MetaEngine) -> RunLock | None:
    """Rank 0 locks the run folder; every rank learns whether it could."""
    lock, refusal = None, None
    if engine.rank == 0:
        try:
            lock = RunLock(output).acquire()
        except (RunFolderInUse, OSError) as error:
            refusal = str(error)
    refusal = distributed.broadcast_object(refusal, what="learning whether rank 0 could lock the run folder")
    if refusal is not None:
        raise BadInput(f"bilevel-maml: {refusal}")
    return lock


#: what ``train --resume-if-exists`` lets differ from the run it continues (``iterations`` may grow)
NOT_THE_RUNS_SETTINGS = RUN_PLACEMENT_KEYS | {"iterations"}


def command_train(args: argparse.Namespace) -> dict:
    device = _join_process_group(_device(args.device), args.dist_timeout)
    config = _run_config(args)
    output = Path(config["output"])
    if args.resume_if_exists and _holds_run(output):
        return _resume_the_same_run(args, config, output)
    _refuse_existing_run(output)
    engine = build_from_config(config, device)
    lock = _lock(output, engine)
    try:
        _refuse_existing_run(output)  # again, now that no other process can start one here
        config["wandb_id"] = secrets.token_hex(4)
        config["wandb_id"] = distributed.broadcast_object(config["wandb_id"], what="receiving the W&B run id")
        if engine.rank == 0:
            atomic_save_json(output / "config.json", config)
        return _train(engine, config, output, args)
    finally:
        if lock is not None:
            lock.release()


def _resume_the_same_run(args: argparse.Namespace, config: dict, output: Path) -> dict:
    """``train --resume-if-exists`` on a folder holding a run: ``resume`` it, if the command asks for
    that run; else one line naming each setting that differs."""
    found = newest_intact(output / "checkpoints")
    resumed = found[1]["config"]  # its total as resume last set it
    # the settings as train wrote them (a checkpoint's config holds what resume resolved, sampler="auto" say)
    stored = json.loads((output / "config.json").read_text()) if (output / "config.json").is_file() else resumed
    differ = [f"{name} (the run's {stored[name]!r}, this command's {config[name]!r})" for name in config
              if name not in NOT_THE_RUNS_SETTINGS and name in stored and stored[name] != config[name]]
    if config["iterations"] < resumed["iterations"]:
        differ.append(f"iterations (the run's {resumed['iterations']}, this command's {config['iterations']}: "
                      f"fewer)")
    if differ:
        raise BadInput(f"bilevel-maml: --resume-if-exists: {output} holds another run: {'; '.join(differ)}; "
                       f"choose another --output")
    finished = _finished(output, found[1], config["iterations"])
    if distributed.is_main_process():
        print(f"bilevel-maml: {output} holds this run; " + (f"it {finished}; nothing to do" if finished else
                                                            "continuing it (--resume-if-exists)"), flush=True)
    if finished:
        return json.loads((output / "result.json").read_text())
    resume = argparse.Namespace(output=str(output), iterations=config["iterations"], device=args.device,
                                plugins=[], dist_timeout=args.dist_timeout, progress=args.progress,
                                **{name: getattr(args, name) for name in RUN_LOGGING_DEFAULTS})
    return command_resume(resume, found)


def _finished(output: Path, checkpoint: dict, iterations: int) -> str | None:
    """"is finished (...)" where the checkpoint reached ``iterations`` and the run was tested: nothing
    is left to do; else None."""
    reached, result = checkpoint["engine"]["meta_iteration"], output / "result.json"
    if reached >= iterations and result.is_file():
        return f"is finished (iteration {reached} of {iterations}; test result in {result})"
    return None


def command_resume(args: argparse.Namespace, found: tuple | None = None) -> dict:
    """``bilevel-maml resume``; ``found``: what :func:`newest_intact` returned for the run, when
    the caller has read it already."""
    output = Path(args.output)
    if not output.is_dir():
        raise BadInput(f"bilevel-maml resume: --output {str(output)!r} is not a run folder")
    path, checkpoint, problems = found or newest_intact(output / "checkpoints")
    if problems or path.name != "last.pt":
        print(f"bilevel-maml resume: warning: {'; '.join(problems) + '; ' if problems else ''}continuing from "
              f"{path} (iteration {checkpoint['engine']['meta_iteration']}), the newest intact checkpoint",
              file=sys.stderr, flush=True)
    config = dict(checkpoint["config"])
    config.setdefault("wandb_id", secrets.token_hex(4))
    if config.get("sampler") == "auto":
        # The saved stream decides: "auto" may choose otherwise today (sinusoids were drawn on the host
        # before 2026-12-06; another device may not hold a split) and the run must go on drawing as it did.
        drawn_on_device = "generator" in checkpoint["engine"]["envs"]["train"]
        config["sampler"] = "device" if drawn_on_device else "learn2learn"
    if args.iterations is not None:  # checked by the parser
        config["iterations"] = args.iterations
    for name, default in RUN_LOGGING_DEFAULTS.items():  # the same W&B run, unless a flag says otherwise
        if getattr(args, name) is None:
            setattr(args, name, config.get(name, default))
        config[name] = getattr(args, name)
    device = _device(args.device or config["device"])
    finished = _finished(output, checkpoint, config["iterations"])
    if finished:
        print(f"bilevel-maml resume: {output} {finished}; pass --iterations N with N > "
              f"{checkpoint['engine']['meta_iteration']} to train further", flush=True)
        return json.loads((output / "result.json").read_text())
    device = _join_process_group(device, args.dist_timeout)
    config["world_size"] = distributed.world()[1]
    engine = build_from_config(config, device)
    lock = _lock(output, engine)
    try:
        engine.load_state_dict(checkpoint["engine"])
        return _train(engine, config, output, args)
    finally:
        if lock is not None:
            lock.release()


def command_evaluate(args: argparse.Namespace) -> dict:
    if args.checkpoint:
        path = Path(args.checkpoint)
    elif args.output:
        folder = Path(args.output) / "checkpoints"
        path = folder / "best.pt" if (folder / "best.pt").exists() else folder / "last.pt"
    else:
        raise BadInput("bilevel-maml evaluate: pass --output RUN_FOLDER or --checkpoint FILE")
    if distributed.launched_distributed():
        raise BadInput("bilevel-maml evaluate runs in one process; start it without torchrun")
    checkpoint = load_checkpoint(path)
    run = checkpoint["config"]
    config = _evaluation_tasks(args, run)
    engine = build_from_config(config, _device(args.device or config["device"]))
    engine.load_parameters(checkpoint["engine"])
    engine.meta_iteration = checkpoint["engine"]["meta_iteration"]
    if args.eval_inner_steps is not None:
        engine.eval_inner_steps = args.eval_inner_steps
    result = engine.test(args.test_tasks, per_step=args.per_step)
    tasks = {key: config[key] for key in EVALUATION_TASKS}
    result.update(checkpoint=str(path), iteration=engine.meta_iteration, eval_inner_steps=engine.eval_inner_steps,
                  **tasks, config=run)
    own_tasks = tasks == {key: run[key] for key in EVALUATION_TASKS}
    name = "evaluation.json" if own_tasks else f"evaluation-{config['dataset']}-{_setting(config)}.json"
    target = Path(args.result) if args.result else path.parent.parent / name
    atomic_save_json(target, result)
    trained_on = "" if own_tasks else f" (trained on {run['dataset']} {_task_kind(run)})"
    print(f"{config['algorithm']} {config['dataset']} {_task_kind(config)}{trained_on}, "
          f"θ from {path} (iteration {engine.meta_iteration}): {_format(result)} "
          f"(95% CI over {result['tasks']} test tasks{_evaluation_steps(engine)}); written to {target}")
    _print_per_step(result)
    return result


#: what a task of ``evaluate`` is made of, the run's unless its flags say otherwise
EVALUATION_TASKS = ("dataset", "ways", "shots", "query_shots")


def _evaluation_tasks(args: argparse.Namespace, run: dict) -> dict:
    """The run's config with the test tasks ``evaluate`` was asked for; another dataset is refused
    in one line, before any data is read, where the run's network cannot take its inputs."""
    config = dict(run)
    if args.dataset is not None and args.dataset != run["dataset"]:
        load_plugins(run.get("plugins", []))
        if run["dataset"] not in DATASETS:
            raise BadInput(f"bilevel-maml: the run's {unknown_dataset(run['dataset'])}")
        asked, trained = DATASETS[args.dataset], DATASETS[run["dataset"]]
        if _inputs(asked) != _inputs(trained):
            raise BadInput(f"bilevel-maml evaluate: --dataset {args.dataset} is {_inputs(asked)}; the run's network "
                           f"was trained on {_inputs(trained)} ({run['dataset']}): evaluate on a dataset of that kind")
        config.update(dataset=args.dataset, data_root=args.data_root)  # None: that dataset's own default
    elif args.data_root is not None:
        config["data_root"] = args.data_root
    config["shots"] = args.shots or config["shots"]
    config["query_shots"] = args.query_shots or config["query_shots"]
    config["download"] = args.download or config["download"]
    return config


def _inputs(spec) -> str:
    """A dataset's tasks and inputs in words: what decides whether a network trained on another takes them."""
    kind = "regression" if spec.regression else "classification"
    if spec.vector_inputs:
        return f"{kind} of vectors of {spec.in_channels} feature{'s' if spec.in_channels != 1 else ''}"
    return f"{kind} of {spec.in_channels}×{spec.image_size}×{spec.image_size} images"


def _setting(config: dict) -> str:
    ways = "" if DATASETS[config["dataset"]].regression else f"{config['ways']}w"
    return f"{ways}{config['shots']}s-{config['query_shots']}q"


def command_plot(args: argparse.Namespace) -> dict:
    folders = list(dict.fromkeys(Path(folder) for folder in args.output))
    for folder in folders:
        if not folder.is_dir():
            raise BadInput(f"bilevel-maml plot: --output {str(folder)!r} is not a run folder")
    if args.file is not None:
        _check_writable_folder("--file", Path(args.file).parent)
        if not args.file.lower().endswith(".png"):
            raise BadInput(f"bilevel-maml plot: --file {args.file!r} must end in .png")
    from bilevel_maml.plots import compare_runs, plot_run, results_table

    if len(folders) == 1:
        drawn = plot_run(folders[0], args.file, dpi=args.dpi)
        print(f"learning curves of {folders[0]} (from {drawn['source']}) written to {drawn['path']}", flush=True)
        return drawn
    drawn = compare_runs(folders, args.file, dpi=args.dpi)
    print(results_table(drawn["rows"], drawn["seed_groups"]))
    print(f"learning curves of {len(folders)} runs written to {drawn['path']}", flush=True)
    return drawn


def _bench(argv: list[str]) -> dict:
    """``bilevel-maml bench``: the source checkout's ``benchmarks/meta_iteration.py`` (the comparison
    harness is not part of the installed package)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_iteration.py"
    if not script.is_file():
        raise BadInput("bilevel-maml bench runs benchmarks/meta_iteration.py of a source checkout of bilevel_maml "
                       "(the comparison harness is not installed with the package); clone the repository and "
                       "install it with `pip install -e .`")
    sys.path.insert(0, str(script.parent))
    import meta_iteration

    return meta_iteration.main(argv, prog="bilevel-maml bench")


def run(argv: list[str] | None = None) -> dict:
    """Run one command; returns its result (raises ``SystemExit`` with a message on bad input).

    :param argv: the arguments after ``bilevel-maml`` (default: ``sys.argv[1:]``).
    """
    args = parse(argv)
    command = {"train": command_train, "evaluate": command_evaluate, "resume": command_resume,
               "plot": command_plot, "bench": lambda args: _bench(args.bench_args)}[args.command]
    try:
        return command(args)
    except BAD_INPUT_ERRORS as error:
        raise BadInput(f"bilevel-maml {args.command}: {error}") from None
    except (CheckpointWriteError, distributed.RankFailure) as error:
        raise SystemExit(f"bilevel-maml {args.command}: {error}") from None
    finally:
        distributed.shutdown()


def run_script(main: Callable[[], object], prog: str | None = None) -> None:
    """Run a script's ``main()`` the way the ``bilevel-maml`` command runs its commands: bad input
    (the ``ValueError``, ``TypeError`` or ``FileNotFoundError`` the library raises, with its
    message, before any work, or a :class:`OneLineParser`'s error) is printed as one line and exits
    with status 2, Ctrl-C with 130;
    the examples end with ``run_script(main)``.

    :param main: the script's entry point, called with no arguments.
    :param prog: the name the line starts with (default: the script's file name).
    """
    prog = prog or Path(sys.argv[0]).name
    try:
        main()
    except BadInput as error:  # already one line, naming its program (a OneLineParser's)
        print(error.code, file=sys.stderr)
        raise SystemExit(2) from None
    except BAD_INPUT_ERRORS as error:
        print(f"{prog}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(exit_status(signal.SIGINT)) from None


def main(argv: list[str] | None = None) -> int:
    """The console script: :func:`run`, with bad input printed as one line and exit status 2.

    :param argv: the arguments after ``bilevel-maml`` (default: ``sys.argv[1:]``).
    :returns: the exit status.
    """
    keep_freed_memory()  # this process is ours: reuse freed activations instead of page-faulting them in
    try:
        run(argv)
    except BadInput as error:
        print(error.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside meta-training (loading data, the final test): nothing to finish
        print("bilevel-maml: stopped by SIGINT outside meta-training; the run folder's checkpoints are as last "
              "written (`bilevel-maml resume` finishes a run whose test was cut short)", file=sys.stderr)
        return exit_status(signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BadInput", "build_parser", "main", "run", "run_script"]
