# Schedule and runtime of the CPU-sized configs: 2000 iterations (warm-up, one step at 75%),
# clipped SGD, logs every 10 iterations, checkpoints every 500, seed 42; gloo DDP without
# device_ids.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py']

max_iters = 2000
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.75)], gamma=0.1),
]
optim_wrapper = dict(
    optimizer=dict(lr=0.01), clip_grad=dict(max_norm=10.0, norm_type=2))

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=500))
log_processor = dict(by_epoch=False, window_size=10)

# Seeded like the Detectron2 twins (SEED: 42), so default runs are reproducible.
randomness = dict(seed=42)

# CPU-friendly distributed settings (also fine on GPUs): gloo, and DDP without device_ids.
# HI-MoE keeps every expert in the autograd graph, so no find_unused_parameters.
env_cfg = dict(dist_cfg=dict(backend='gloo'))
model_wrapper_cfg = dict(
    type='MMDistributedDataParallel',
    device_ids=None,
    broadcast_buffers=False,
    find_unused_parameters=False)
