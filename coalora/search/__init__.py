"""Pareto configuration search between epochs; the Lightning callback lives in
:mod:`coalora.search.callback`, so importing this package needs neither Lightning nor Hydra."""

from coalora.search.encoding import OptionGrid
from coalora.search.gp import fit_loss_surrogate, guided_walk, log_ehvi, reference_point
from coalora.search.search import ParetoGPSearch, RandomWalkSearch, SearchRound

__all__ = [
    "OptionGrid",
    "ParetoGPSearch",
    "RandomWalkSearch",
    "SearchRound",
    "fit_loss_surrogate",
    "guided_walk",
    "log_ehvi",
    "reference_point",
]
