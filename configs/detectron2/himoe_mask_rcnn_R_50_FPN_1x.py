"""HI-MoE Mask R-CNN R50-FPN 1x on COCO as a LazyConfig: Detectron2's model-zoo
``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py`` with HI-MoE ROI heads, the same model as
``himoe_mask_rcnn_R_50_FPN_1x.yaml``.

Train with Detectron2's stock tool, unchanged:
    python <detectron2>/tools/lazyconfig_train_net.py --config-file <this file> --num-gpus 8
"""
from detectron2 import model_zoo

from himoe_plugin.detectron2.lazy import use_himoe_roi_heads

stock = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
model, dataloader, optimizer, lr_multiplier, train = (
    stock.model, stock.dataloader, stock.optimizer, stock.lr_multiplier, stock.train
)
use_himoe_roi_heads(model, num_experts=8, top_k=2, num_groups=4, scene_top_k=2)
