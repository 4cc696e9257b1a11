"""Upper/Lower Betty problems for each meta-learning algorithm, and their registry."""

import inspect

from bilevel_maml._factories import refuse_taken_name
from bilevel_maml.problems.anil import ANILLower, ANILUpper
from bilevel_maml.problems.base import MetaLearner, TaskLearner, current_inner_step
from bilevel_maml.problems.boil import BOILLower, BOILUpper
from bilevel_maml.problems.fomaml import FOMAMLLower, FOMAMLUpper
from bilevel_maml.problems.imaml import IMAMLLower, IMAMLUpper
from bilevel_maml.problems.maml import MAMLLower, MAMLUpper
from bilevel_maml.problems.mamlpp import MAMLPlusPlusLower, MAMLPlusPlusUpper, PerStepBatchNorm
from bilevel_maml.problems.metasgd import MetaSGDLower, MetaSGDUpper
from bilevel_maml.problems.reptile import ReptileLower, ReptileUpper

#: algorithm name -> (Upper class, Lower class); :func:`register_algorithm` adds to it.
ALGORITHMS: dict[str, tuple[type[MetaLearner], type[TaskLearner]]] = {
    "maml": (MAMLUpper, MAMLLower),
    "fomaml": (FOMAMLUpper, FOMAMLLower),
    "imaml": (IMAMLUpper, IMAMLLower),
    "metasgd": (MetaSGDUpper, MetaSGDLower),
    "anil": (ANILUpper, ANILLower),
    "maml++": (MAMLPlusPlusUpper, MAMLPlusPlusLower),
    "reptile": (ReptileUpper, ReptileLower),
    "boil": (BOILUpper, BOILLower),
}

#: the names of the algorithms this package ships
BUILT_IN_ALGORITHMS = tuple(sorted(ALGORITHMS))

#: constructor arguments every Upper/Lower takes from the engine builder, not from the user's options
_BUILDER_ARGUMENTS = {"self", "args", "kwargs", "module", "optimizer", "meta_batch_size", "loss_fn", "scheduler",
                      "gradient_clipping", "meta_lr_schedule", "min_meta_lr", "name", "config", "device", "inner_lr",
                      "inner_steps"}


def register_algorithm(name: str, upper: type[MetaLearner], lower: type[TaskLearner]) -> None:
    """Make a new variant selectable by name in :func:`bilevel_maml.build_engine` and the CLI.

    :param name: the name (case-insensitive; ``--algorithm NAME`` on the command line).
    :param upper: the Upper class, a :class:`~bilevel_maml.problems.base.MetaLearner` subclass.
    :param lower: the Lower class, a :class:`~bilevel_maml.problems.base.TaskLearner` subclass.
    :raises ValueError: when ``name`` is taken by other classes (a built-in algorithm, say); the same
        classes defined again (a reloaded module) replace the old ones.
    """
    if not (isinstance(upper, type) and issubclass(upper, MetaLearner)
            and isinstance(lower, type) and issubclass(lower, TaskLearner)):
        raise TypeError(f"register_algorithm needs a MetaLearner subclass and a TaskLearner subclass, got "
                        f"{upper!r} and {lower!r}")
    # the built-in algorithms are in ALGORITHMS: taking one's name is refused as registered
    refuse_taken_name("algorithm", name.lower(), (), ALGORITHMS.get(name.lower()), (upper, lower), "the variant")
    ALGORITHMS[name.lower()] = (upper, lower)


#: iMAML's settings, which build_engine sets from its own arguments (and the CLI from its flags)
#: for the classes built on iMAML's: name -> the class that takes it
_IMAML_SETTINGS = {"lam": IMAMLLower, "cg_iterations": IMAMLUpper}


def imaml_settings_of(upper: type, lower: type) -> set[str]:
    """Which of iMAML's settings (``lam``, ``cg_iterations``) a variant's classes take: those of
    them built on iMAML's classes take them as iMAML does, from the builder, not as options."""
    return {name for name, owner in _IMAML_SETTINGS.items() if issubclass(upper, owner) or issubclass(lower, owner)}


def _set_by_the_builder(cls: type) -> set[str]:
    return _BUILDER_ARGUMENTS | imaml_settings_of(cls, cls)


def option_defaults(upper: type, lower: type) -> dict[str, dict]:
    """The options a variant's classes take (keyword arguments of their constructors beyond what
    every Upper/Lower takes), with their defaults: ``{"upper": {...}, "lower": {...}}``.

    :param upper: the Upper class.
    :param lower: the Lower class.
    """
    found = {}
    for side, cls in (("upper", upper), ("lower", lower)):
        parameters = inspect.signature(cls.__init__).parameters.values()
        found[side] = {p.name: p.default for p in parameters if p.name not in _set_by_the_builder(cls)
                       and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return found


def split_options(name: str, options: dict) -> tuple[dict, dict]:
    """``options`` for algorithm ``name`` split into the Upper's and the Lower's keyword arguments;
    a name neither class takes is a ValueError that lists the ones they do take.

    :param name: a registered algorithm.
    :param options: keyword arguments of its classes by name.
    """
    upper, lower = ALGORITHMS[name]
    defaults = option_defaults(upper, lower)
    upper_options, lower_options = {}, {}
    for key, value in options.items():
        if key in defaults["upper"]:
            upper_options[key] = value
        elif key in defaults["lower"]:
            lower_options[key] = value
        elif key in imaml_settings_of(upper, lower):
            raise ValueError(f"{name}'s {key} is not an option: --{key.replace('_', '-')} sets it "
                             f"(build_engine({key}=...) in Python)")
        else:
            known = sorted({**defaults["upper"], **defaults["lower"]})
            raise ValueError(f"{name} has no option {key!r}; its options: {', '.join(known) or 'none'}")
    return upper_options, lower_options


def options_in_use(name: str, options: dict) -> dict:
    """Every option of algorithm ``name`` with the value a run given ``options`` uses: the given
    ones, the constructors' defaults for the rest (options without a default are left out).

    :param name: a registered algorithm.
    :param options: the options given.
    """
    split_options(name, options)  # unknown names are refused
    defaults = option_defaults(*ALGORITHMS[name])
    found = {key: value for key, value in {**defaults["upper"], **defaults["lower"]}.items()
             if value is not inspect.Parameter.empty}
    return {**found, **options}


__all__ = [
    "ALGORITHMS",
    "ANILLower",
    "ANILUpper",
    "BOILLower",
    "BOILUpper",
    "MAMLPlusPlusLower",
    "MAMLPlusPlusUpper",
    "PerStepBatchNorm",
    "ReptileLower",
    "ReptileUpper",
    "current_inner_step",
    "imaml_settings_of",
    "option_defaults",
    "options_in_use",
    "split_options",
    "FOMAMLLower",
    "FOMAMLUpper",
    "IMAMLLower",
    "IMAMLUpper",
    "MAMLLower",
    "MAMLUpper",
    "MetaSGDLower",
    "MetaSGDUpper",
    "MetaLearner",
    "TaskLearner",
    "register_algorithm",
]
