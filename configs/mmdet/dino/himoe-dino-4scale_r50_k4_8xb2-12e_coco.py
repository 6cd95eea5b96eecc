# Ablation: top-4 routing inside the scene subset (full setting otherwise).
_base_ = './himoe-dino-4scale_r50_8xb2-12e_coco.py'

model = dict(moe=dict(router=dict(top_k=4)))
