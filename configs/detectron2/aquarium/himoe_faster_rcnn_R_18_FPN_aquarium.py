"""HI-MoE Faster R-CNN R18-FPN on the bundled Aquarium data, as a LazyConfig: the same model,
data and schedule as ``himoe_faster_rcnn_R_18_FPN_aquarium.yaml``.

Loading this file registers the bundled datasets ($HIMOE_DATA_ROOT, default ../shared/data).
Train and evaluate with Detectron2's stock tool, unchanged:
    python <detectron2>/tools/lazyconfig_train_net.py --config-file <this file>
"""
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from himoe_plugin.detectron2 import register_bundled_datasets
from himoe_plugin.detectron2.engine import has_fast_coco_eval
from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

register_bundled_datasets()

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.stem = L(BasicStem)(in_channels=3, out_channels=64, norm="BN")
model.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="BN")
model.backbone.bottom_up.freeze_at = 0
model.proposal_generator.pre_nms_topk = (1000, 1000)
model.proposal_generator.post_nms_topk = (500, 1000)
model.roi_heads.num_classes = 7
model.roi_heads.batch_size_per_image = 256
model.roi_heads.mask_in_features = None
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None
use_himoe_roi_heads(model, num_experts=8, top_k=2, num_groups=4, scene_top_k=2)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "aquarium_train"
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(224, 256, 288), sample_style="choice", max_size=480),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 2
dataloader.test.dataset.names = "aquarium_valid"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=256, max_size=427)]
dataloader.test.num_workers = 2
dataloader.evaluator.use_fast_impl = has_fast_coco_eval()

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.02
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[1100, 1400, 1500]),
    warmup_length=100 / 1500,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""
train.max_iter = 1500
train.eval_period = 0
train.checkpointer.period = 500
train.output_dir = "./output/detectron2/aquarium_himoe_lazy"
train.device = "cuda" if torch.cuda.is_available() else "cpu"
train.seed = 42
