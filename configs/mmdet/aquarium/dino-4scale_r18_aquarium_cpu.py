# Dense DINO (4 scales) with a ResNet-18 backbone on the bundled Aquarium data, sized for CPU
# (short side 256, 3 encoder + 3 decoder layers, FFN 1024, 100 queries), trained from scratch:
# no pretrained weights, trainable BN. The HI-MoE counterpart
# (himoe-dino-4scale_r18_aquarium_cpu.py) differs only in its `moe` entry.
# The dataset is set here as in ../_base_/datasets/aquarium_detection.py (MMEngine does not
# allow two bases that both define the dataloaders, and the stock DINO config defines them).
_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'

data_root = '{{$HIMOE_DATA_ROOT:{{ fileDirname }}/../../../../shared/data}}/aquarium/'
metainfo = dict(
    classes=('fish', 'jellyfish', 'penguin', 'puffin', 'shark', 'starfish', 'stingray'))

num_queries = 100
model = dict(
    num_queries=num_queries,
    backbone=dict(
        depth=18,
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[128, 256, 512]),
    encoder=dict(num_layers=3, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=1024))),
    decoder=dict(num_layers=3, layer_cfg=dict(ffn_cfg=dict(feedforward_channels=1024))),
    bbox_head=dict(num_classes=7),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=50)),
    test_cfg=dict(max_per_img=num_queries))

scale = (427, 256)  # long side <= 427, short side <= 256
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/'),
        pipeline=train_pipeline,
        filter_cfg=dict(filter_empty_gt=False)))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_valid.json',
        data_prefix=dict(img='images/valid/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_valid.json')
test_evaluator = val_evaluator

max_iters = 2000
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.75)], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=2e-4))

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=500))
log_processor = dict(by_epoch=False, window_size=10)
randomness = dict(seed=42)

# CPU-friendly distributed settings (also fine on GPUs): gloo, and DDP without device_ids.
env_cfg = dict(dist_cfg=dict(backend='gloo'))
model_wrapper_cfg = dict(
    type='MMDistributedDataParallel',
    device_ids=None,
    broadcast_buffers=False,
    find_unused_parameters=False)
