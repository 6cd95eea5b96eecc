# Ablation "token-level": no scene subset (one group holding every expert), so each token /
# query is routed on its own among all 16 experts. Encoder + decoder, k=2, shared expert.
_base_ = './himoe-dino-4scale_r50_8xb2-12e_coco.py'

model = dict(moe=dict(router=dict(num_groups=1, scene_top_k=1)))
