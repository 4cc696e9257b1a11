"""bilevel_maml: MAML, FOMAML and iMAML as Betty bilevel problems, with exact meta-gradients."""

from bilevel_maml.builder import build_engine
from bilevel_maml.engine import MetaEngine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.problems import (
    ALGORITHMS,
    FOMAMLLower,
    FOMAMLUpper,
    IMAMLLower,
    IMAMLUpper,
    MAMLLower,
    MAMLUpper,
    MetaLearner,
    TaskLearner,
    register_algorithm,
)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "EpisodicEnv",
    "FOMAMLLower",
    "FOMAMLUpper",
    "IMAMLLower",
    "IMAMLUpper",
    "MAMLLower",
    "MAMLUpper",
    "MetaEngine",
    "MetaLearner",
    "TaskLearner",
    "build_engine",
    "register_algorithm",
]
