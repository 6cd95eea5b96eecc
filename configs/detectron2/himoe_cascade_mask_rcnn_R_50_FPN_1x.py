"""HI-MoE Cascade Mask R-CNN R50-FPN 1x on COCO as a LazyConfig: Detectron2's model-zoo
``common/models/cascade_rcnn.py`` with HI-MoE cascade ROI heads, the same model as
``himoe_cascade_mask_rcnn_R_50_FPN_1x.yaml``.

Train with Detectron2's stock tool, unchanged:
    python <detectron2>/tools/lazyconfig_train_net.py --config-file <this file> --num-gpus 8
"""
from detectron2 import model_zoo

from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

model = model_zoo.get_config("common/models/cascade_rcnn.py").model
model.backbone.bottom_up.freeze_at = 2
use_himoe_roi_heads(model, num_experts=8, top_k=2, num_groups=4, scene_top_k=2, route_once="")

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
