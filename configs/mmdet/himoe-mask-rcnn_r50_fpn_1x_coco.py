# HI-MoE Mask R-CNN R50-FPN 1x on COCO: the stock config with the RoI head swapped (the same
# HI-MoE box head as himoe-faster-rcnn_r50_fpn_1x_coco.py; the mask head is unchanged).
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/himoe_runtime.py']

model = dict(
    roi_head=dict(
        type='InstanceMoERoIHead',
        stats_period=50,
        bbox_head=dict(
            type='MoEShared2FCBBoxHead',
            router=dict(
                type='HierarchicalRouter',
                num_experts=8,
                top_k=2,
                num_groups=4,
                scene_top_k=2),
            loss_balance=dict(
                type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
            loss_router_z=dict(type='RouterZLoss', loss_weight=0.001))))

# The console shows the routing statistics as one compact `himoe:` line; every value goes to
# the scalars file (see _base_/himoe_runtime.py; a base cannot set it next to the stock runtime).
log_processor = dict(type='HIMoELogProcessor')
