# Dense Faster R-CNN R18-FPN on the bundled Aquarium data, sized for CPU (short side 256,
# narrow FPN and box head), trained from scratch: no pretrained weights, trainable BN.
# The HI-MoE counterpart (himoe-faster-rcnn_r18_fpn_aquarium_cpu.py) differs only in its RoI
# head, so the two compare like for like.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    '../_base_/datasets/aquarium_detection.py',
    '../_base_/cpu_schedule.py',
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
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=256, num_classes=7)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=dict(sampler=dict(num=256))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))
