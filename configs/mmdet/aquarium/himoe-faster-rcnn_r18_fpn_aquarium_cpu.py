# HI-MoE version of faster-rcnn_r18_fpn_aquarium_cpu.py: only the RoI head differs.
# 6 experts in 3 groups (one per Aquarium supercategory: bird, fish-like, invertebrate); the
# scene router keeps 2 groups per image and every RoI goes to 2 of their 4 experts.
# Super-class supervision of the scene router (off here) needs:
#   model.roi_head.bbox_head.loss_scene=dict(type='SceneSupervisionLoss', loss_weight=0.1)
#   custom_hooks=[dict(type='RoutingStatisticsHook'), dict(type='WeightsOnlyCheckpointHook'),
#                 dict(type='SceneSupervisionHook')]   (a list replaces the inherited one)
_base_ = ['./faster-rcnn_r18_fpn_aquarium_cpu.py', '../_base_/himoe_runtime.py']

model = dict(
    roi_head=dict(
        type='InstanceMoERoIHead',
        bbox_head=dict(
            type='MoEShared2FCBBoxHead',
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
