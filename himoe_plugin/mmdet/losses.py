"""Config entries of the auxiliary routing losses.

The core router computes the terms itself, unweighted, from counts summed over all data-parallel
ranks (``Routing.losses``). Each entry below weights its terms with its own ``loss_weight``, as
every MMDetection loss does; an entry left out of the config (None) means no such term.
"""
from __future__ import annotations

from typing import Dict

from mmdet.registry import MODELS
from torch import Tensor, nn

from ..core import LOSS_BALANCE, LOSS_SCENE_BALANCE, LOSS_SCENE_SUPERVISION, LOSS_Z, Routing


class RoutingLoss(nn.Module):
    """Base of the routing-loss entries.

    Subclasses declare ``term_weights``: the name of each core term they weight
    (``Routing.losses`` keys) -> the constructor argument holding its weight.
    """

    term_weights: Dict[str, str] = {}

    def weights(self) -> Dict[str, float]:
        """``{constructor argument: weight}`` of this entry."""
        return {arg: getattr(self, arg) for arg in self.term_weights.values()}

    def forward(self, routing: Routing) -> Dict[str, Tensor]:
        """This entry's weighted terms of ``routing`` (scalars; terms of weight 0 are left out;
        empty at test time)."""
        out = {}
        for name, arg in self.term_weights.items():
            weight = getattr(self, arg)
            if name in routing.losses and weight > 0:
                out[name] = weight * routing.losses[name]
        return out


@MODELS.register_module()
class LoadBalancingLoss(RoutingLoss):
    """Switch-Transformer load balancing of the experts and of the scene groups.

    ``loss_moe_balance = loss_weight * E * sum_e f_e * P_e`` over experts (f: fraction of
    routed RoIs, P: mean router probability) and ``loss_moe_scene_balance`` the same over the
    scene router's groups (``scene_loss_weight``), both over the global batch.

    Args:
        loss_weight: weight of the expert balance term (>= 0).
        scene_loss_weight: weight of the scene-group balance term (>= 0).
    """

    term_weights = {LOSS_BALANCE: 'loss_weight', LOSS_SCENE_BALANCE: 'scene_loss_weight'}

    def __init__(self, loss_weight: float = 0.01, scene_loss_weight: float = 0.01) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.scene_loss_weight = scene_loss_weight


@MODELS.register_module()
class RouterZLoss(RoutingLoss):
    """ST-MoE router z-loss ``loss_moe_z``: mean squared logsumexp of both routers' logits.

    Args:
        loss_weight: weight of the term (>= 0).
    """

    term_weights = {LOSS_Z: 'loss_weight'}

    def __init__(self, loss_weight: float = 0.001) -> None:
        super().__init__()
        self.loss_weight = loss_weight


@MODELS.register_module()
class SceneSupervisionLoss(RoutingLoss):
    """Super-class supervision of the scene router, ``loss_moe_scene_supervision``.

    Cross-entropy between the scene router's group distribution and each image's histogram of
    ground-truth supercategories (one expert group per supercategory). The class -> group map
    comes from the training dataset through ``SceneSupervisionHook``.

    Args:
        loss_weight: weight of the term (> 0 to enable it).
    """

    term_weights = {LOSS_SCENE_SUPERVISION: 'loss_weight'}

    def __init__(self, loss_weight: float = 0.1) -> None:
        super().__init__()
        self.loss_weight = loss_weight
