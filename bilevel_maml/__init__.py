"""bilevel_maml: MAML, FOMAML, iMAML, Meta-SGD and ANIL as Betty bilevel problems, with exact meta-gradients."""

from bilevel_maml.builder import build_engine
from bilevel_maml.engine import MetaEngine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.stopping import GracefulStop
from bilevel_maml.problems import (
    ALGORITHMS,
    ANILLower,
    ANILUpper,
    FOMAMLLower,
    FOMAMLUpper,
    IMAMLLower,
    IMAMLUpper,
    MAMLLower,
    MAMLUpper,
    MetaLearner,
    MetaSGDLower,
    MetaSGDUpper,
    TaskLearner,
    register_algorithm,
)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "ANILLower",
    "ANILUpper",
    "EpisodicEnv",
    "FOMAMLLower",
    "FOMAMLUpper",
    "GracefulStop",
    "IMAMLLower",
    "IMAMLUpper",
    "MAMLLower",
    "MAMLUpper",
    "MetaEngine",
    "MetaLearner",
    "MetaSGDLower",
    "MetaSGDUpper",
    "TaskLearner",
    "build_engine",
    "register_algorithm",
]
