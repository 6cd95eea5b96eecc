# Ablation "instance-only": MoE FFNs in the decoder only (object queries = instances), routed
# among all 16 experts without a scene subset. The encoder keeps its dense FFNs.
_base_ = './himoe-dino-4scale_r50_8xb2-12e_coco.py'

model = dict(moe=dict(encoder_layers=[], router=dict(num_groups=1, scene_top_k=1)))
