# HI-MoE DINO, the paper's full setting: every encoder and decoder FFN is an HI-MoE FFN with
# 16 experts in 4 groups; the scene router keeps 2 groups (8 experts) per image and every token /
# object query goes to 2 of them, plus an always-on shared expert.
# Everything else is the stock config. Start from a dense DINO checkpoint with
#   --cfg-options load_from=<dense dino .pth>   (every expert = the dense FFN: upcycling)
_base_ = ['mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py', '../_base_/himoe_runtime.py']

model = dict(
    type='HIMoEDINO',
    moe=dict(
        encoder_layers='all',
        decoder_layers='all',
        router=dict(
            type='HierarchicalRouter',
            num_experts=16,
            top_k=2,
            num_groups=4,
            scene_top_k=2),
        shared_expert=True,
        shared_expert_weight=0.5,
        expert_channels=None,  # None: the FFN's feedforward_channels (2048)
        loss_balance=dict(type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
        loss_router_z=dict(type='RouterZLoss', loss_weight=0.001),
        upcycle=dict(mode='copy', noise_std=0.0)))

# Compact `himoe:` console line; every routing statistic goes to the scalars file
# (see ../_base_/himoe_runtime.py; a base cannot set it next to the stock runtime).
log_processor = dict(type='HIMoELogProcessor')
