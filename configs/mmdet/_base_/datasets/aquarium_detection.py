# Aquarium (7 classes, COCO format) from the bundled data: train = Roboflow train (448 images),
# val/test = Roboflow valid (127 images). The data root is $HIMOE_DATA_ROOT, else
# ../shared/data next to the repository checkout (same convention as the Detectron2 adapter).
_base_ = 'mmdet::_base_/datasets/coco_detection.py'

data_root = '{{$HIMOE_DATA_ROOT:{{ fileDirname }}/../../../../../shared/data}}/aquarium/'
metainfo = dict(
    classes=('fish', 'jellyfish', 'penguin', 'puffin', 'shark', 'starfish', 'stingray'))

train_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/')))
val_dataloader = dict(
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_valid.json',
        data_prefix=dict(img='images/valid/')))
test_dataloader = val_dataloader

val_evaluator = dict(ann_file=data_root + 'annotations/instances_valid.json')
test_evaluator = val_evaluator
