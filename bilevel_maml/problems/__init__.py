"""Upper/Lower Betty problems for each meta-learning algorithm, and their registry."""

from bilevel_maml.problems.anil import ANILLower, ANILUpper
from bilevel_maml.problems.base import MetaLearner, TaskLearner
from bilevel_maml.problems.fomaml import FOMAMLLower, FOMAMLUpper
from bilevel_maml.problems.imaml import IMAMLLower, IMAMLUpper
from bilevel_maml.problems.maml import MAMLLower, MAMLUpper
from bilevel_maml.problems.metasgd import MetaSGDLower, MetaSGDUpper

#: algorithm name -> (Upper class, Lower class); :func:`register_algorithm` adds to it.
ALGORITHMS: dict[str, tuple[type[MetaLearner], type[TaskLearner]]] = {
    "maml": (MAMLUpper, MAMLLower),
    "fomaml": (FOMAMLUpper, FOMAMLLower),
    "imaml": (IMAMLUpper, IMAMLLower),
    "metasgd": (MetaSGDUpper, MetaSGDLower),
    "anil": (ANILUpper, ANILLower),
}


def register_algorithm(name: str, upper: type[MetaLearner], lower: type[TaskLearner]) -> None:
    """Make a new variant selectable by name in :func:`bilevel_maml.build_engine` and the CLI."""
    if not (issubclass(upper, MetaLearner) and issubclass(lower, TaskLearner)):
        raise TypeError("register_algorithm needs a MetaLearner subclass and a TaskLearner subclass")
    ALGORITHMS[name.lower()] = (upper, lower)


__all__ = [
    "ALGORITHMS",
    "ANILLower",
    "ANILUpper",
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
