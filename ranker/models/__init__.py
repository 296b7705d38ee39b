"""The model zoo. Every model: ``forward(cat [B, F_cat], num [B, F_num]) -> logits [B, T]``."""

from ranker.models.adatt import AdaTT
from ranker.models.base import MultiTaskModel
from ranker.models.home import HoME
from ranker.models.mmoe import MMoE
from ranker.models.ple import PLE
from ranker.models.shared_bottom import SharedBottom

__all__ = ["PLE", "AdaTT", "HoME", "MMoE", "MultiTaskModel", "SharedBottom"]
