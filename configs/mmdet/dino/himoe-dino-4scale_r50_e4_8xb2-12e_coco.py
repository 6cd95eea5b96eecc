# Ablation: 4 experts in 4 groups of one; the scene keeps 2, each token / query uses both.
_base_ = './himoe-dino-4scale_r50_8xb2-12e_coco.py'

model = dict(moe=dict(router=dict(num_experts=4, num_groups=4, scene_top_k=2, top_k=2)))
