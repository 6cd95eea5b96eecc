# HI-MoE version of cascade-rcnn_r18_fpn_aquarium_cpu.py: only the RoI head differs. Every
# stage's bbox head becomes its MoE counterpart with its own experts (6 in 3 groups; the scene
# router keeps 2 groups per image, every RoI goes to 2 of their 4 experts).
_base_ = ['./cascade-rcnn_r18_fpn_aquarium_cpu.py', '../_base_/himoe_runtime.py']

model = dict(
    roi_head=dict(
        type='InstanceMoECascadeRoIHead',
        stats_period={{_base_.default_hooks.logger.interval}},
        route_once=None,  # or 'scene' / 'instance': stage 0 routes, later stages reuse it
        moe_bbox_head=dict(
            router=dict(
                type='HierarchicalRouter',
                num_experts=6,
                top_k=2,
                num_groups=3,
                scene_top_k=2),
            loss_balance=dict(
                type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
            loss_router_z=dict(type='RouterZLoss', loss_weight=0.001))))

# The console shows the routing statistics as one compact `himoe:` line; every value goes to
# the scalars file (see ../_base_/himoe_runtime.py; a base cannot set it next to the stock runtime).
log_processor = dict(type='HIMoELogProcessor')
