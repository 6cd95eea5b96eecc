# HI-MoE Mask R-CNN R18-FPN on the bundled COCO128 (80 classes, polygon masks), sized for CPU
# like ../aquarium/faster-rcnn_r18_fpn_aquarium_cpu.py (narrow FPN, box and mask heads, trained
# from scratch), with the RoI head of himoe-mask-rcnn_r50_fpn_1x_coco.py.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    '../_base_/datasets/coco128_instance.py',
    '../_base_/cpu_schedule.py',
    '../_base_/himoe_runtime.py',
]

channels = 128
model = dict(
    backbone=dict(
        depth=18,
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        type='InstanceMoERoIHead',
        stats_period={{_base_.default_hooks.logger.interval}},
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(
            type='MoEShared2FCBBoxHead',
            in_channels=channels,
            fc_out_channels=256,
            router=dict(
                type='HierarchicalRouter',
                num_experts=8,
                top_k=2,
                num_groups=4,
                scene_top_k=2),
            loss_balance=dict(
                type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
            loss_router_z=dict(type='RouterZLoss', loss_weight=0.001)),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(in_channels=channels, conv_out_channels=channels)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=dict(sampler=dict(num=256))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))

# The console shows the routing statistics as one compact `himoe:` line; every value goes to
# the scalars file (see ../_base_/himoe_runtime.py; a base cannot set it next to the stock runtime).
log_processor = dict(type='HIMoELogProcessor')
