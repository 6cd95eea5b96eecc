# Ablation: 8 experts in 4 groups of two; the scene keeps 2 groups (4 experts), k=2.
_base_ = './himoe-dino-4scale_r50_8xb2-12e_coco.py'

model = dict(moe=dict(router=dict(num_experts=8, num_groups=4, scene_top_k=2, top_k=2)))
