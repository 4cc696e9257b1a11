"""bilevel_maml: MAML, FOMAML, iMAML, Meta-SGD, ANIL, MAML++, Reptile and BOIL as Betty bilevel problems, with exact meta-gradients."""

from bilevel_maml.builder import build_engine
from bilevel_maml.callbacks import Callback
from bilevel_maml.engine import MetaEngine
from bilevel_maml.env import EpisodicEnv
from bilevel_maml.stopping import GracefulStop
from bilevel_maml.problems import (
    ALGORITHMS,
    ANILLower,
    ANILUpper,
    BOILLower,
    BOILUpper,
    FOMAMLLower,
    FOMAMLUpper,
    IMAMLLower,
    IMAMLUpper,
    MAMLLower,
    MAMLPlusPlusLower,
    MAMLPlusPlusUpper,
    MAMLUpper,
    MetaLearner,
    MetaSGDLower,
    MetaSGDUpper,
    ReptileLower,
    ReptileUpper,
    TaskLearner,
    current_inner_step,
    register_algorithm,
)
from bilevel_maml.plugins import load_plugin

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "ANILLower",
    "ANILUpper",
    "BOILLower",
    "BOILUpper",
    "Callback",
    "EpisodicEnv",
    "FOMAMLLower",
    "FOMAMLUpper",
    "GracefulStop",
    "IMAMLLower",
    "IMAMLUpper",
    "MAMLLower",
    "MAMLPlusPlusLower",
    "MAMLPlusPlusUpper",
    "MAMLUpper",
    "MetaEngine",
    "MetaLearner",
    "MetaSGDLower",
    "MetaSGDUpper",
    "ReptileLower",
    "ReptileUpper",
    "TaskLearner",
    "build_engine",
    "current_inner_step",
    "load_plugin",
    "register_algorithm",
]
