# Dense Cascade R-CNN R18-FPN (3 stages) on the bundled Aquarium data: mmdet's stock Cascade
# R-CNN model at the CPU size of faster-rcnn_r18_fpn_aquarium_cpu.py (narrow FPN and box heads,
# 256 sampled RoIs per stage, trained from scratch). The HI-MoE counterpart
# (himoe-cascade-rcnn_r18_fpn_aquarium_cpu.py) differs only in its RoI head.
_base_ = [
    'mmdet::_base_/models/cascade-rcnn_r50_fpn.py',
    '../_base_/datasets/aquarium_detection.py',
    '../_base_/cpu_schedule.py',
]

channels = 128
# Per stage, as in the stock config: box-delta stds and the IoU of a positive RoI.
stage_target_stds = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]
stage_ious = [0.5, 0.6, 0.7]
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
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=[
            dict(type='Shared2FCBBoxHead', in_channels=channels, fc_out_channels=256,
                 roi_feat_size=7, num_classes=7, reg_class_agnostic=True,
                 bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                 target_stds=stds),
                 loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
                 loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))
            for stds in stage_target_stds
        ]),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=[
            dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=iou, neg_iou_thr=iou,
                               min_pos_iou=iou, match_low_quality=False, ignore_iof_thr=-1),
                 sampler=dict(type='RandomSampler', num=256, pos_fraction=0.25, neg_pos_ub=-1,
                              add_gt_as_proposals=True),
                 pos_weight=-1, debug=False)
            for iou in stage_ious
        ]),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))
