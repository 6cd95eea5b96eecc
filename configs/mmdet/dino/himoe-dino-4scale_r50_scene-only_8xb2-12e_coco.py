# Ablation "scene-only": no instance router; the scene router picks 2 of the 16 experts per image
# (one group per expert) and every token / query of the image uses those two.
_base_ = './himoe-dino-4scale_r50_8xb2-12e_coco.py'

model = dict(
    moe=dict(router=dict(num_groups=0, scene_top_k=2, top_k=2, instance_router=False)))
