"""HI-MoE Mask R-CNN (MMDetection): trains on COCO128 polygon masks and evaluates boxes and
masks with the Runner; the R50 COCO config is the stock one with the RoI head swapped."""
import json
import pickle

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from .mmdet_helpers import (REPO_ROOT, mmdet_stock_config, without_roi_head, without_scope,
                           write_config)
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

import himoe_plugin.mmdet  # noqa: F401  (registers the modules)

MASK_CONFIG = REPO_ROOT / 'configs/mmdet/coco128/himoe-mask-rcnn_r18_fpn_coco128_cpu.py'
COCO_MASK_CONFIG = REPO_ROOT / 'configs/mmdet/himoe-mask-rcnn_r50_fpn_1x_coco.py'
ITERS = 3


@pytest.mark.slow
def test_mask_rcnn_trains_and_evaluates_boxes_and_masks(tmp_path, himoe_data_root):
    coco = json.loads((himoe_data_root / 'coco128/annotations/instances_train.json').read_text())
    coco['images'] = coco['images'][:8]
    kept = {image['id'] for image in coco['images']}
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] in kept]
    slice_json = tmp_path / 'coco128_slice.json'
    slice_json.write_text(json.dumps(coco))
    predictions = tmp_path / 'predictions.pkl'
    config = write_config(tmp_path / 'mask_cfg.py', MASK_CONFIG, f"""
train_cfg = dict(max_iters={ITERS}, val_interval={ITERS})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={ITERS}))
model = dict(roi_head=dict(stats_period=1), test_cfg=dict(rcnn=dict(score_thr=0.0)))
randomness = dict(seed=0)
val_dataloader = dict(dataset=dict(ann_file={str(slice_json)!r}))
val_evaluator = [
    dict(type='CocoMetric', ann_file={str(slice_json)!r}, metric=['bbox', 'segm']),
    dict(type='DumpDetResults', out_file_path={str(predictions)!r}),
]
""")
    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(tmp_path / 'work_dir')
    runner = Runner.from_cfg(cfg)
    runner.train()

    logged = runner.message_hub.log_scalars  # every iteration's values (logger interval 1)
    for name in ('loss_mask', 'loss_cls', 'loss_moe_balance', 'loss_moe_z'):
        values = logged[f'train/{name}'].data[0]
        assert len(values) == ITERS and np.isfinite(values).all(), name
    loads = np.stack([logged[f'train/himoe/expert_load/{e}'].data[0] for e in range(8)])
    assert loads.shape == (8, ITERS) and np.allclose(loads.sum(axis=0), 1.0, atol=1e-5)
    metrics = {name: float(buffer.current()) for name, buffer in logged.items()
               if name.startswith('val/coco/')}
    for metric in ('val/coco/bbox_mAP', 'val/coco/segm_mAP', 'val/coco/segm_mAP_50'):
        assert 0.0 <= metrics[metric] <= 1.0, metric
    with open(predictions, 'rb') as f:
        predicted = pickle.load(f)
    assert len(predicted) == 8
    first = next(p['pred_instances'] for p in predicted if len(p['pred_instances']['scores']) > 0)
    # Masks are run-length encoded, one per box, at the original image size.
    assert len(first['masks']) == len(first['bboxes']) == len(first['scores'])
    assert first['masks'][0]['size'] == [predicted[0]['ori_shape'][0], predicted[0]['ori_shape'][1]]


def test_coco_mask_config_is_the_stock_one_with_the_roi_head_swapped():
    himoe = Config.fromfile(str(COCO_MASK_CONFIG))
    stock = Config.fromfile(str(mmdet_stock_config('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')))
    assert without_roi_head(himoe) == without_roi_head(stock)
    for key in ('mask_roi_extractor', 'mask_head', 'bbox_roi_extractor'):
        assert without_scope(himoe.model.roi_head[key].to_dict()) == \
            without_scope(stock.model.roi_head[key].to_dict()), key
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(himoe.model)
    assert type(model.roi_head).__name__ == 'InstanceMoERoIHead'
    assert type(model.roi_head.bbox_head).__name__ == 'MoEShared2FCBBoxHead'
    assert type(model.roi_head.mask_head).__name__ == 'FCNMaskHead'
