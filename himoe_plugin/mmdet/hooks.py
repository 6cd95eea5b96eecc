"""``SceneSupervisionHook``: the class -> supercategory groups of the training dataset."""
from __future__ import annotations

from typing import List, Sequence

from mmdet.registry import HOOKS
from mmengine.fileio import get_local_path
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from ..core import MoEConfigError, groups_of_supercategories, read_coco_supercategories
from .scene_routing import SceneRoutedRoIHead


@HOOKS.register_module()
class SceneSupervisionHook(Hook):
    """Before training, give the HI-MoE RoI head (``InstanceMoERoIHead``,
    ``InstanceMoECascadeRoIHead``) the expert group of every class.

    Groups are the supercategories (sorted by name) that the training dataset's COCO
    annotation file gives its classes; the scene router needs exactly one group per
    supercategory. Enable super-class supervision with, in the config::

        model = dict(roi_head=dict(bbox_head=dict(
            router=dict(num_groups=3, ...),
            loss_scene=dict(type='SceneSupervisionLoss', loss_weight=0.1))))
        custom_hooks = [dict(type='SceneSupervisionHook')]
    """

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        roi_head = getattr(model, 'roi_head', None)
        if not isinstance(roi_head, SceneRoutedRoIHead):
            raise TypeError('SceneSupervisionHook needs a detector with an HI-MoE RoI head '
                            '(InstanceMoERoIHead, InstanceMoECascadeRoIHead), got roi_head of type '
                            f'{type(roi_head).__name__}')
        if roi_head.class_to_group is None:
            print_log('SceneSupervisionHook: roi_head.bbox_head.loss_scene is not set, '
                      'the scene router gets no super-class targets', logger='current')
            return
        dataset = runner.train_dataloader.dataset
        while hasattr(dataset, 'dataset'):  # RepeatDataset, ClassBalancedDataset, ...
            dataset = dataset.dataset
        if not hasattr(dataset, 'ann_file') or not hasattr(dataset, 'cat_ids'):
            raise TypeError('SceneSupervisionHook reads supercategories from a COCO-format '
                            f'training dataset, got {type(dataset).__name__}')
        groups = supercategory_groups(
            dataset.ann_file, dataset.cat_ids, roi_head.scene_groups)
        roi_head.set_class_groups(groups)
        print_log(f'SceneSupervisionHook: class -> supercategory group {groups}',
                  logger='current')


def supercategory_groups(ann_file: str, cat_ids: Sequence[int], num_groups: int) -> List[int]:
    """Group of every class (label order ``cat_ids``): the index of its supercategory among
    the sorted supercategories of these classes. Raises ``MoEConfigError`` naming
    ``num_groups`` unless there are exactly ``num_groups`` supercategories."""
    try:
        with get_local_path(ann_file) as local_file:
            supercategories = read_coco_supercategories(local_file, cat_ids)
    except ValueError as err:
        raise MoEConfigError('roi_head.bbox_head.loss_scene', ann_file, str(err)) from None
    return groups_of_supercategories(supercategories, num_groups, 'roi_head.bbox_head.router.num_groups')
