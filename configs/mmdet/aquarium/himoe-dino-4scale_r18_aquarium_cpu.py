# HI-MoE version of dino-4scale_r18_aquarium_cpu.py: every encoder and decoder FFN is an HI-MoE
# FFN with 8 experts in 4 groups; the scene router keeps 2 groups (4 experts) per image, every
# token / object query goes to 2 of them, plus a shared expert. Only `model.type` and `moe` differ.
_base_ = ['./dino-4scale_r18_aquarium_cpu.py', '../_base_/himoe_runtime.py']

model = dict(
    type='HIMoEDINO',
    moe=dict(
        encoder_layers='all',
        decoder_layers='all',
        router=dict(
            type='HierarchicalRouter',
            num_experts=8,
            top_k=2,
            num_groups=4,
            scene_top_k=2),
        shared_expert=True,
        loss_balance=dict(type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
        loss_router_z=dict(type='RouterZLoss', loss_weight=0.001)))

# The console shows the routing statistics as one compact `himoe:` line; every value goes to
# the scalars file (see ../_base_/himoe_runtime.py; a base cannot set it next to the stock runtime).
log_processor = dict(type='HIMoELogProcessor')
