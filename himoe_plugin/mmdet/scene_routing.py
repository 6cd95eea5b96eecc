"""What every HI-MoE RoI head (standard and cascade) does around its MoE bbox heads: pool each
image's neck features for the scene router, derive its super-class targets, check its settings."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from mmdet.structures import SampleList
from torch import Tensor

from ..core import MoEConfigError, masked_mean_pool, scene_targets_from_labels
from .bbox_head import MoEConvFCBBoxHead


@dataclass
class SceneInputs:
    """What the scene router needs besides the feature maps, for one batch.

    Attributes:
        image_shapes: B pairs (h, w), each image's size before batch padding.
        targets: optional ``(targets (B, G), has_target (B,))`` super-class targets.
    """

    image_shapes: List[Tuple[int, int]]
    targets: Optional[Tuple[Tensor, Tensor]] = None


class SceneRoutedRoIHead:
    """Mixin of the RoI heads that feed MoE bbox heads (``InstanceMoERoIHead``,
    ``InstanceMoECascadeRoIHead``): call ``_init_scene_routing`` after the stock ``__init__``
    and run the bbox heads inside ``with self._scene(...)``."""

    def _init_scene_routing(self,
                            bbox_heads: Sequence[torch.nn.Module],
                            neck_strides: Sequence[int],
                            scene_featmap_strides: Optional[Sequence[int]],
                            stats_period: int) -> None:
        """
        Args:
            bbox_heads: the bbox heads (all must be MoE heads; the first one's router settings
                define the scene groups).
            neck_strides: strides of the levels the bbox RoI extractor reads.
            scene_featmap_strides: strides of the neck levels the scene router pools (the
                first ``len(...)`` levels); None uses ``neck_strides``.
            stats_period: write the mean statistics every this many training iterations.
        """
        for head in bbox_heads:
            if not isinstance(head, MoEConvFCBBoxHead):
                raise MoEConfigError(
                    'roi_head.bbox_head.type', type(head).__name__,
                    f'{type(self).__name__} needs MoE bbox heads, e.g. MoEShared2FCBBoxHead')
        strides = neck_strides if scene_featmap_strides is None else scene_featmap_strides
        if not strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                              for s in strides):
            raise MoEConfigError('roi_head.scene_featmap_strides', scene_featmap_strides,
                                 'must be a non-empty list of positive integer strides')
        neck_strides = list(neck_strides)
        if list(strides) != neck_strides[:len(strides)]:
            raise MoEConfigError('roi_head.scene_featmap_strides', scene_featmap_strides,
                                 f'the scene router pools the first len(strides) neck levels, whose '
                                 f'strides are {neck_strides[:len(strides)]} (of {neck_strides})')
        if isinstance(stats_period, bool) or not isinstance(stats_period, int) \
                or stats_period < 1:
            raise MoEConfigError('roi_head.stats_period', stats_period, 'must be an integer >= 1')
        self.scene_featmap_strides = [int(s) for s in strides]
        self.stats_period = stats_period
        self.scene_groups = bbox_heads[0].moe_config.groups
        self._scene_inputs: Optional[SceneInputs] = None
        if any(head.scene_supervised for head in bbox_heads):
            self.register_buffer(
                'class_to_group',
                torch.full((bbox_heads[0].num_classes,), -1, dtype=torch.long),
                persistent=False)
        else:
            self.class_to_group: Optional[Tensor] = None
        self._class_groups_set = False

    def set_class_groups(self, class_to_group: Sequence[int]) -> None:
        """Set the expert group (supercategory index) of every class, for super-class
        supervision of the scene router (done by ``SceneSupervisionHook``)."""
        if self.class_to_group is None:
            raise RuntimeError('set_class_groups: the bbox head has no loss_scene entry')
        groups = torch.as_tensor(list(class_to_group), dtype=torch.long)
        if groups.shape != self.class_to_group.shape or groups.min() < 0 \
                or groups.max() >= self.scene_groups:
            raise ValueError(
                f'class_to_group needs one group in [0, {self.scene_groups}) for each of the '
                f'{self.class_to_group.numel()} classes, got {groups.tolist()}')
        self.class_to_group.copy_(groups)
        self._class_groups_set = True

    def scene_features(self, x: Tuple[Tensor]) -> Tensor:
        """(B, C) each image's neck features mean-pooled over its unpadded area."""
        scene = self._scene_inputs
        if scene is None:
            raise RuntimeError(f'{type(self).__name__}: the bbox heads run inside loss(), '
                               'predict() or forward(), which give the scene router the image shapes')
        strides = self.scene_featmap_strides
        return masked_mean_pool(x[:len(strides)], strides, scene.image_shapes)

    @contextmanager
    def _scene(self,
               batch_data_samples: Optional[SampleList],
               with_targets: bool = False,
               num_images: int = 0,
               padded_shape: Optional[Sequence[int]] = None) -> Iterator[None]:
        """Make the batch's image shapes (and super-class targets) visible to the bbox-head
        calls for the duration of one head call."""
        if batch_data_samples is not None:
            shapes = [tuple(s.metainfo['img_shape'][:2]) for s in batch_data_samples]
        else:
            stride = self.scene_featmap_strides[0]
            shapes = [(padded_shape[0] * stride, padded_shape[1] * stride)] * num_images
        targets = None
        if with_targets and self.class_to_group is not None:
            targets = self._scene_targets(batch_data_samples)
        self._scene_inputs = SceneInputs(shapes, targets)
        try:
            yield
        finally:
            self._scene_inputs = None

    def _scene_targets(self, batch_data_samples: SampleList) -> Tuple[Tensor, Tensor]:
        if not self._class_groups_set:
            raise RuntimeError(
                'roi_head.bbox_head.loss_scene is set, but no class -> supercategory groups '
                "were given: add custom_hooks=[dict(type='SceneSupervisionHook')] to the config")
        labels = [sample.gt_instances.labels for sample in batch_data_samples]
        return scene_targets_from_labels(labels, self.class_to_group, self.scene_groups)
