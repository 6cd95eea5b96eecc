# Aquarium (7 classes, COCO format) from the bundled data, at CPU size (short side <= 256, long
# side <= 427, batch 2): train = Roboflow train (448 images), val/test = Roboflow valid (127
# images). The data root is $HIMOE_DATA_ROOT, else ../shared/data next to the repository
# checkout (same convention as the Detectron2 adapter).
_base_ = 'mmdet::_base_/datasets/coco_detection.py'

data_root = '{{$HIMOE_DATA_ROOT:{{ fileDirname }}/../../../../../shared/data}}/aquarium/'
metainfo = dict(
    classes=('fish', 'jellyfish', 'penguin', 'puffin', 'shark', 'starfish', 'stingray'))

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
        pipeline=train_pipeline))
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
