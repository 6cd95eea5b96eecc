"""Box head whose fully connected layers (all or a contiguous run of them) are HI-MoE experts."""
from __future__ import annotations

import logging
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY
from fvcore.nn import weight_init
from torch import nn

from ..core import (
    FCBlockLayout,
    HierarchicalRouter,
    MoEConfig,
    MoEConfigError,
    Routing,
    SceneRouting,
    build_fc_experts,
    check_noise_std,
    init_fc_experts,
    load_fc_block,
    require_routing_inputs,
    run_fc_block,
)
from .config import config_keys, lazy_config_keys, moe_config_from_cfg, validate_himoe_cfg

logger = logging.getLogger(__name__)


@ROI_BOX_HEAD_REGISTRY.register()
class MoEConvFCBoxHead(nn.Module):
    """``FastRCNNConvFCHead`` with fc layers ``moe_fc_layers`` replaced by routed experts.

    The instance router sees the RoI's spatially averaged feature (C,) when the experts start at
    the first fc layer, else the input of the expert block.

    Layout (names as in the stock head, so dense checkpoints load): ``conv{i}`` (dense),
    ``fc{i}`` for dense fc layers, ``moe_block`` (a core ``MoEBlock``: ``moe_block.router``,
    ``moe_block.moe``) for the expert block. Each expert is the whole block (e.g. fc1+fc2),
    run sparsely. Loading a dense checkpoint (``fc{i}`` keys of the block, no expert keys)
    upcycles it: every expert starts from the dense layers. Checkpoints written before the
    block existed (``router.*``, ``moe.*`` keys) load unchanged.
    """

    #: Only ROI heads with ``feeds_moe_box_head`` (the HI-MoE ones) can run this head.
    needs_moe_roi_heads = True

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        conv_dims: List[int],
        fc_dims: List[int],
        moe_config: Union[MoEConfig, Mapping],
        moe_fc_layers: Sequence[int] = (0, 1),
        expert_dim: int = 0,
        conv_norm: str = "",
        scene_dim: Optional[int] = None,
        upcycle_noise_std: float = 0.0,
    ):
        """
        Args:
            input_shape: shape of the pooled RoI features (C, H, W).
            conv_dims / fc_dims / conv_norm: as in ``FastRCNNConvFCHead``.
            moe_config: router, expert and loss settings (a ``MoEConfig`` or a dict of its
                fields, e.g. from a LazyConfig).
            moe_fc_layers: contiguous 0-based indices of the fc layers that become experts.
            expert_dim: hidden width inside a multi-layer expert (0: keep ``fc_dims``).
            scene_dim: channels of the scene features (default: ``input_shape.channels``).
            upcycle_noise_std: relative noise added to experts upcycled from a dense checkpoint.
        """
        super().__init__()
        require_routing_inputs(self, _unfed_error)
        keys = config_keys()
        if isinstance(moe_config, Mapping):
            keys = lazy_config_keys()
            moe_config = MoEConfig.from_mapping(moe_config, key_of="box_head.moe_config.{}".format)
        if not fc_dims:
            raise ValueError("fc_dims: an MoE box head needs at least one fc layer")
        self.upcycle_noise_std = check_noise_std(upcycle_noise_std, "upcycle_noise_std")
        self.upcycle_report: List[str] = []

        size: Union[int, Tuple[int, int, int]] = (input_shape.channels, input_shape.height, input_shape.width)
        self.convs = []
        for k, conv_dim in enumerate(conv_dims):
            conv = Conv2d(
                size[0],
                conv_dim,
                kernel_size=3,
                padding=1,
                bias=not conv_norm,
                norm=get_norm(conv_norm, conv_dim),
                activation=nn.ReLU(),
            )
            self.add_module(f"conv{k + 1}", conv)
            self.convs.append(conv)
            size = (conv_dim, size[1], size[2])
        layout = FCBlockLayout.checked(
            int(np.prod(size)), size[0], fc_dims, [int(i) for i in moe_fc_layers], expert_dim,
            {"moe_fc_layers": "moe_fc_layers", "expert_dim": "expert_dim"},
        )
        self.moe_fc_layers = list(layout.moe_fc_layers)
        self.fcs_before = self._dense_fcs(layout, layout.before)
        router = HierarchicalRouter(moe_config, scene_dim or input_shape.channels, layout.router_input_dim, keys)
        self.moe_block = build_fc_experts(layout, router)
        self.fcs_after = self._dense_fcs(layout, layout.after)
        self._output_size = fc_dims[-1]

        for conv in self.convs:
            weight_init.c2_msra_fill(conv)
        for fc in self.fcs_before + self.fcs_after:
            weight_init.c2_xavier_fill(fc)
        init_fc_experts(self.moe_block, lambda weight: nn.init.kaiming_uniform_(weight, a=1))  # c2_xavier_fill

    @property
    def moe_config(self) -> MoEConfig:
        """The validated router, expert and loss settings."""
        return self.moe_block.config

    def _dense_fcs(self, layout: FCBlockLayout, indices: range) -> List[nn.Linear]:
        fcs = []
        for k in indices:
            fc = nn.Linear(layout.fc_input(k), layout.fc_dims[k])
            self.add_module(f"fc{k + 1}", fc)
            fcs.append(fc)
        return fcs

    @classmethod
    def from_config(cls, cfg, input_shape):
        validate_himoe_cfg(cfg)
        head = cfg.MODEL.ROI_BOX_HEAD
        return {
            "input_shape": input_shape,
            "conv_dims": [head.CONV_DIM] * head.NUM_CONV,
            "fc_dims": [head.FC_DIM] * head.NUM_FC,
            "conv_norm": head.NORM,
            "moe_config": moe_config_from_cfg(cfg),
            "moe_fc_layers": list(cfg.MODEL.HIMOE.MOE_FC_LAYERS),
            "expert_dim": cfg.MODEL.HIMOE.EXPERT_DIM,
            "upcycle_noise_std": cfg.MODEL.HIMOE.UPCYCLE_NOISE_STD,
        }

    def forward(
        self,
        x: torch.Tensor,
        scene_features: torch.Tensor,
        image_index: torch.Tensor,
        scene_targets: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        scene: Optional[SceneRouting] = None,
        routing: Optional[Routing] = None,
    ) -> Tuple[torch.Tensor, Routing]:
        """
        Args:
            x: (N, C, H, W) pooled RoI features of all images.
            scene_features: (B, C_scene) pooled image features (None with ``scene``/``routing``).
            image_index: (N,) image of each RoI.
            scene_targets: optional super-class targets for the scene router.
            scene / routing: the scene routing, or the whole routing of these RoIs, to reuse
                (computed by an earlier cascade stage, see ``MoEBlock.forward``).
        Returns:
            (N, fc_dims[-1]) box features and the ``Routing`` (losses, statistics).
        """
        for conv in self.convs:
            x = conv(x)
        return run_fc_block(
            x, self.fcs_before, self.moe_block, self.fcs_after, scene_features, image_index,
            scene_targets, scene=scene, routing=routing,
        )

    @property
    @torch.jit.unused
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._output_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        dense = [f"{prefix}fc{i + 1}" for i in self.moe_fc_layers]
        report = load_fc_block(self.moe_block, state_dict, prefix, "moe_block", dense, self.upcycle_noise_std)
        if report:
            self.upcycle_report = report
            logger.info("upcycled the dense box head into experts:\n  %s", "\n  ".join(report))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _unfed_error(box_head: nn.Module) -> MoEConfigError:
    return MoEConfigError(
        "box_head", type(box_head).__name__,
        "an HI-MoE box head runs only under HI-MoE ROI heads (InstanceMoEROIHead, or "
        "InstanceMoECascadeROIHeads for cascades; yaml: MODEL.ROI_HEADS.NAME), which give it the "
        "scene features and the image of every RoI; this model's ROI heads call it with the RoI "
        "features only",
    )
