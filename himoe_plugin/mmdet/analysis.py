"""MMDetection side of the routing analysis: run a detector (HI-MoE RoI head, cascade RoI head or
DETR family) over its test dataloader and hand every image's ground truth and routed RoIs /
queries to ``himoe_plugin.analysis``; draw predictions coloured by expert with mmdet's
``DetLocalVisualizer``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import mmcv
import torch
from mmdet.structures import DetDataSample
from mmdet.visualization import DetLocalVisualizer
from torch import Tensor, nn

from ..analysis import (ImageTruth, RoutedInstances, RoutingAnalysis, draw_expert_legend, expert_colors,
                        no_prediction_note, routed_box_label)
from ..analysis.capture import RoutingCapture, layer_infos
from ..core import MoEConfigError, Routing, read_coco_supercategories


def dataset_truths(dataset) -> Dict[int, ImageTruth]:
    """Ground truth of a detection dataset (xyxy boxes in original pixels, label indices;
    ignored/crowd boxes left out) by image id."""
    truths = {}
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        instances = [i for i in info.get('instances', []) if not i.get('ignore_flag', 0)]
        truths[info['img_id']] = ImageTruth(
            image_id=info['img_id'],
            boxes=torch.tensor([i['bbox'] for i in instances], dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor([i['bbox_label'] for i in instances], dtype=torch.long))
    return truths


def is_moe_detr(model: nn.Module) -> bool:
    """Whether ``model`` is an HI-MoE DETR-family detector (its MoE FFNs in ``moe_ffns``)."""
    return hasattr(model, 'moe_ffns')


def output_routing_key(model_cfg: Mapping) -> str:
    """The config key of the switch that puts the routing into the predictions:
    ``test_cfg.rcnn.output_routing`` for RoI heads (standard and cascade), else
    ``test_cfg.output_routing`` (DETR family)."""
    test_cfg = model_cfg.get('test_cfg') or {}
    return 'test_cfg.rcnn.output_routing' if 'rcnn' in test_cfg else 'test_cfg.output_routing'


def enable_output_routing(model_cfg) -> str:
    """Turn on, in a model config, the routing in the predictions; returns the key it set."""
    key = output_routing_key(model_cfg)
    owner = model_cfg.setdefault('test_cfg', {})
    if key == 'test_cfg.rcnn.output_routing':
        owner = owner['rcnn']
    owner['output_routing'] = True
    return key


def last_decoder_ffn(model: nn.Module) -> nn.Module:
    """The MoE FFN of the last MoE decoder layer of a DETR-family model (whose routing the
    predictions carry)."""
    decoder = [ffn for ffn in model.moe_ffns if ffn.stats_scope.startswith('decoder')]
    if not decoder:
        raise MoEConfigError('moe.decoder_layers', [], 'the routing analysis of a DETR-family model '
                             'follows the object queries: it needs an MoE decoder layer')
    return decoder[-1]


def new_analysis(model: nn.Module, dataset) -> RoutingAnalysis:
    """An empty analysis of the model's MoE layers (DETR family: the last MoE decoder layer) on
    the classes of ``dataset`` (with their COCO supercategories when the annotation file has them)."""
    supercategories = None
    if hasattr(dataset, 'cat_ids'):
        try:
            supercategories = read_coco_supercategories(dataset.ann_file, dataset.cat_ids)
        except ValueError:
            supercategories = None
    layers = layer_infos(model)
    if is_moe_detr(model):
        layers = {name: info for name, info in layers.items() if name == last_decoder_ffn(model).stats_scope}
    return RoutingAnalysis(dataset.metainfo['classes'], layers, supercategories)


def extracted_rois(extractor: nn.Module):
    """Reads an RoI extractor call's inputs: the RoIs (N, 5) and the level (``P<l>``) of each."""

    def read(args) -> Tuple[Tensor, List[str]]:
        feats, rois = args[0], args[1]
        strides = extractor.featmap_strides
        levels = extractor.map_roi_levels(rois, len(feats)) if len(feats) > 1 else torch.zeros(len(rois))
        return rois, [f'P{int(math.log2(strides[int(level)]))}' for level in levels.tolist()]

    return read


def routed_images(model: nn.Module, data_loader, max_images: Optional[int] = None
                  ) -> Iterator[Tuple[DetDataSample, List[RoutedInstances]]]:
    """Run ``model`` (eval mode, ``test_cfg.rcnn.output_routing`` on) over ``data_loader``; per
    image yield its data sample (``pred_instances`` with ``experts`` and ``expert_weights``)
    and the routing of every RoI in every MoE layer (every stage of a cascade), with boxes in
    original image pixels. DETR-family models (``test_cfg.output_routing``): the instances are
    the predictions (query-class pairs; their boxes), with the routing of their query in the
    last MoE decoder layer."""
    model.eval()
    if is_moe_detr(model):
        yield from _routed_queries(model, data_loader, max_images)
        return
    roi_head = getattr(model, 'roi_head', None)
    if roi_head is None:
        raise TypeError(f'routing analysis covers detectors with an HI-MoE RoI head and HI-MoE DETR-family '
                        f'detectors, got {type(model).__name__}')
    extractors = roi_head.bbox_roi_extractor
    extractors = extractors if isinstance(extractors, nn.ModuleList) else [extractors]
    previous = roi_head.test_cfg.get('output_routing', False)
    roi_head.test_cfg['output_routing'] = True
    seen = 0
    try:
        with torch.no_grad(), RoutingCapture(model, {e: extracted_rois(e) for e in extractors}) as capture:
            for data in data_loader:
                capture.clear()
                samples = model.test_step(data)
                routed: List[List[RoutedInstances]] = [[] for _ in samples]
                for layer, routing, (rois, levels) in capture.pairs:
                    image_of_roi = rois[:, 0].long()
                    for i, sample in enumerate(samples):
                        rows = (image_of_roi == i).nonzero().squeeze(1)
                        scale = rois.new_tensor(sample.metainfo['scale_factor']).repeat(2)
                        routed[i].append(RoutedInstances(
                            layer, rois[rows, 1:] / scale, routing.expert_index[rows],
                            routing.combine_weight[rows], routing.scene_groups[i],
                            [levels[r] for r in rows.tolist()]))
                for sample, image_routing in zip(samples, routed):
                    yield sample, image_routing
                    seen += 1
                    if max_images is not None and seen >= max_images:
                        return
    finally:
        roi_head.test_cfg['output_routing'] = previous


def _routing_of_call(args, output) -> Routing:
    """The ``Routing`` of one MoE FFN call: returned with the outputs, or appended to the token
    context the FFN was given (its second argument)."""
    if isinstance(output, tuple) and isinstance(output[-1], Routing):
        return output[-1]
    return args[1].routings[-1]


def _routed_queries(model: nn.Module, data_loader, max_images: Optional[int]
                    ) -> Iterator[Tuple[DetDataSample, List[RoutedInstances]]]:
    ffn = last_decoder_ffn(model)
    scenes: List[Tensor] = []
    handle = ffn.register_forward_hook(
        lambda module, args, output: scenes.append(_routing_of_call(args, output).scene_groups))
    previous = model.test_cfg.get('output_routing', False)
    model.test_cfg['output_routing'] = True
    seen = 0
    try:
        with torch.no_grad():
            for data in data_loader:
                scenes.clear()
                for image, sample in enumerate(model.test_step(data)):
                    pred = sample.pred_instances
                    yield sample, [RoutedInstances(ffn.stats_scope, pred.bboxes, pred.experts, pred.expert_weights,
                                                   scenes[-1][image])]
                    seen += 1
                    if max_images is not None and seen >= max_images:
                        return
    finally:
        handle.remove()
        model.test_cfg['output_routing'] = previous


def draw_routed_predictions(sample: DetDataSample, class_names: Sequence[str], num_experts: int,
                            path: Path, max_boxes: int = 20, score_thresh: float = 0.0) -> int:
    """Draw the ``max_boxes`` best predictions with score >= ``score_thresh`` on the image, each
    box in the colour of its first expert, labelled ``<class> | expert <e> (w <weight>)``, with a
    legend of the expert colours; an image without such predictions says so on a band at the
    bottom. Writes ``path``; returns the number of boxes drawn. The predictions need ``experts``
    / ``expert_weights`` (``output_routing`` on)."""
    all_pred = sample.pred_instances.cpu()
    if len(all_pred) and 'experts' not in all_pred:
        raise ValueError('the predictions carry no routing (experts): set test_cfg.rcnn.output_routing=True '
                         '(RoI heads) or test_cfg.output_routing=True (DETR family)')
    pred = all_pred[all_pred.scores >= score_thresh]
    pred = pred[pred.scores.argsort(descending=True)[:max_boxes]]
    colors = [tuple(int(255 * c) for c in rgb) for rgb in expert_colors(num_experts)]
    experts, weights = (pred.experts[:, 0].tolist(), pred.expert_weights[:, 0].tolist()) if len(pred) else ([], [])
    visualizer = DetLocalVisualizer(name=f'himoe_routing_{path.stem}')
    visualizer.set_image(mmcv.imread(sample.img_path, channel_order='rgb'))
    if len(pred):
        box_colors = [colors[e] for e in experts]
        visualizer.draw_bboxes(pred.bboxes, edge_colors=box_colors, line_widths=3)
        labels = [routed_box_label(class_names[c], e, w) for c, e, w in zip(pred.labels.tolist(), experts, weights)]
        visualizer.draw_texts(labels, pred.bboxes[:, :2], colors='black', font_sizes=12,
                              bboxes=[dict(facecolor=tuple(v / 255 for v in c), alpha=0.8, pad=0.7,
                                           edgecolor='none') for c in box_colors])
    best = float(all_pred.scores.max()) if len(all_pred) else None
    note = None if len(pred) else no_prediction_note(score_thresh, best)
    drawn = draw_expert_legend(visualizer.get_image(), num_experts, experts, note)
    mmcv.imwrite(drawn[..., ::-1], str(path))
    return len(pred)
