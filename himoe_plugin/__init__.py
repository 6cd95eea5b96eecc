"""HI-MoE: hierarchical instance-conditioned mixture-of-experts for Detectron2 and MMDetection.

``himoe_plugin.core`` is plain PyTorch. The framework adapters live in
``himoe_plugin.detectron2`` and ``himoe_plugin.mmdet``; import the one you use.
"""
__version__ = "0.1.0"
