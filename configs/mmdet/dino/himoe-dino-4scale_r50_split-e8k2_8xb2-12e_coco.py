# Fine-grained split upcycling: each of 8 experts holds 2048 / 8 = 256 hidden units of the dense
# FFN; every token / query uses 2 of them (a quarter of the dense FFN's compute), no shared
# expert. Loading a dense DINO checkpoint (load_from=...) splits its FFNs into the experts.
_base_ = './himoe-dino-4scale_r50_8xb2-12e_coco.py'

model = dict(
    moe=dict(
        router=dict(num_experts=8, num_groups=4, scene_top_k=2, top_k=2),
        shared_expert=False,
        upcycle=dict(mode='split', noise_std=0.0)))
