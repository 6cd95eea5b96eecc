"""Config entries of the auxiliary routing losses.

The core router computes these losses itself, from counts summed over all data-parallel
ranks, weighted by its ``MoEConfig``. Each entry below is the MMDetection face of one of them:
its weights become the core's weights (an absent entry means weight 0, so the core skips the
term), and calling it on a ``Routing`` returns its weighted terms for the loss dict.
"""
from __future__ import annotations

from typing import Dict, Tuple

from mmdet.registry import MODELS
from torch import Tensor, nn

from ..core import LOSS_BALANCE, LOSS_SCENE_BALANCE, LOSS_SCENE_SUPERVISION, LOSS_Z, Routing


class RoutingLoss(nn.Module):
    """Base of the routing-loss entries.

    Subclasses declare ``core_weights`` (constructor argument -> ``MoEConfig`` field) and
    ``loss_names`` (the keys the core gives their terms in ``Routing.losses``).
    """

    core_weights: Dict[str, str] = {}
    loss_names: Tuple[str, ...] = ()

    def moe_config_weights(self) -> Dict[str, float]:
        """``{MoEConfig field: weight}`` set by this entry."""
        return {field: getattr(self, arg) for arg, field in self.core_weights.items()}

    @classmethod
    def disabled_weights(cls) -> Dict[str, float]:
        """``{MoEConfig field: 0.0}``: the weights when the entry is left out of the config."""
        return {field: 0.0 for field in cls.core_weights.values()}

    def forward(self, routing: Routing) -> Dict[str, Tensor]:
        """This entry's weighted loss terms of ``routing`` (scalars; empty at test time)."""
        return {name: routing.losses[name] for name in self.loss_names if name in routing.losses}


@MODELS.register_module()
class LoadBalancingLoss(RoutingLoss):
    """Switch-Transformer load balancing of the experts and of the scene groups.

    ``loss_moe_balance = loss_weight * E * sum_e f_e * P_e`` over experts (f: fraction of
    routed RoIs, P: mean router probability) and ``loss_moe_scene_balance`` the same over the
    scene router's groups, both over the global batch.

    Args:
        loss_weight: weight of the expert balance term (>= 0).
        scene_loss_weight: weight of the scene-group balance term (>= 0).
    """

    core_weights = {'loss_weight': 'balance_loss_weight',
                    'scene_loss_weight': 'scene_balance_loss_weight'}
    loss_names = (LOSS_BALANCE, LOSS_SCENE_BALANCE)

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

    core_weights = {'loss_weight': 'z_loss_weight'}
    loss_names = (LOSS_Z,)

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

    core_weights = {'loss_weight': 'scene_supervision_weight'}
    loss_names = (LOSS_SCENE_SUPERVISION,)

    def __init__(self, loss_weight: float = 0.1) -> None:
        super().__init__()
        self.loss_weight = loss_weight
