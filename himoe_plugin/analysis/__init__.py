"""Routing analysis, shared by the Detectron2 and MMDetection adapters: which experts the RoIs /
object queries of every class, size and feature level are sent to, and how specialised the
experts are (tidy table, JSON summary, PNG figures). Needs numpy and matplotlib."""
from .figures import draw_expert_legend, expert_colors, no_prediction_note, routed_box_label, write_figures
from .report import (LayerInfo, RoutingAnalysis, entropy_bits, format_metrics, mutual_information_bits,
                     specialization)
from .table import (BACKGROUND, MATCH_IOU, SIZES, ImageTruth, RoutedInstances, RoutingTable, box_iou,
                    size_of)

__all__ = [
    "BACKGROUND",
    "MATCH_IOU",
    "SIZES",
    "ImageTruth",
    "LayerInfo",
    "RoutedInstances",
    "RoutingAnalysis",
    "RoutingTable",
    "box_iou",
    "draw_expert_legend",
    "entropy_bits",
    "expert_colors",
    "format_metrics",
    "mutual_information_bits",
    "no_prediction_note",
    "routed_box_label",
    "size_of",
    "specialization",
    "write_figures",
]
