# HI-MoE Faster R-CNN R50-FPN 1x on COCO: the stock config with the RoI head swapped.
# The two fc layers of the box head become 8 experts in 4 groups of 2; the scene router keeps
# 2 groups (4 experts) per image and each RoI uses its top 2 of them; routing losses are added to the loss dict, routing statistics
# are logged as himoe/* whenever the logger logs (RoutingStatisticsHook).
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', './_base_/himoe_runtime.py']

model = dict(
    roi_head=dict(
        type='InstanceMoERoIHead',
        bbox_head=dict(
            type='MoEShared2FCBBoxHead',
            moe_fc_layers=[0, 1],
            expert_channels=0,
            shared_expert=False,
            router=dict(
                type='HierarchicalRouter',
                num_experts=8,
                top_k=2,
                num_groups=4,
                scene_top_k=2),
            loss_balance=dict(
                type='LoadBalancingLoss', loss_weight=0.01, scene_loss_weight=0.01),
            loss_router_z=dict(type='RouterZLoss', loss_weight=0.001))))

# The console shows the routing statistics as one compact `himoe:` line; every value goes to
# the scalars file (see _base_/himoe_runtime.py; a base cannot set it next to the stock runtime).
log_processor = dict(type='HIMoELogProcessor')
