"""HI-MoE Faster R-CNN R50-FPN 1x on COCO as a LazyConfig: the same model as
``himoe_faster_rcnn_R_50_FPN_1x.yaml``, built from Detectron2's model-zoo LazyConfigs.

Train with Detectron2's stock tool, unchanged:
    python <detectron2>/tools/lazyconfig_train_net.py --config-file <this file> --num-gpus 8
"""
from detectron2 import model_zoo

from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.roi_heads.mask_in_features = None
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None
model.backbone.bottom_up.freeze_at = 2
use_himoe_roi_heads(model, num_experts=8, top_k=2, num_groups=4, scene_top_k=2)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
