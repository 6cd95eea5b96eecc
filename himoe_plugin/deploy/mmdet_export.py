"""ONNX export of MMDetection detectors (Faster R-CNN and DINO, dense or HI-MoE) without mmdeploy.

``MMDetONNXModel`` is the tensor forward of a detector, written so that ``torch.onnx.export``
(TorchScript-based exporter) traces it into a graph that is exact on inputs of any size:

    images (B, 3, H, W) float32   the preprocessed batch (``model.data_preprocessor`` output)
    image_sizes (B, 2) int64      each image's (h, w) before batch padding (``img_shape``)
    box_scale (B, 2) float32      Faster R-CNN: 1 / ``scale_factor`` (w, h), boxes are multiplied
    scale_factors (B, 2) float32  DINO: ``scale_factor`` (w, h), boxes are divided (as mmdet does)
 -> boxes (D, 4) float32, scores (D,), labels (D,) int64, image_index (D,) int64
    (detections of the B images in the original image coordinates, image by image).

Every size that depends on the input (proposals per level, boxes above the score threshold, NMS
survivors, RoIs per FPN level, the valid area each scene router pools) is computed from tensors,
never frozen from the sample: post-processing uses ``torchvision.ops.nms`` (ONNX
``NonMaxSuppression``), RoI pooling ``torchvision.ops.roi_align`` (ONNX ``RoiAlign``), and DINO's
deformable attention mmcv's PyTorch fallback (``grid_sample``); no mmcv custom op enters the
graph. The HI-MoE layers themselves export through the core's export dispatch (selected by the
core while tracing). The batch size is fixed at export (the per-image post-processing is
unrolled); height and width are dynamic. DINO has no padding mask in the graph (as mmdet's own
export path): a DINO batch holds images of one size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmdet.models.detectors import DINO, TwoStageDetector
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.task_modules.coders.delta_xywh_bbox_coder import delta2bbox
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from torch import Tensor, nn
from torchvision.ops import nms, roi_align

from ..core import MoEConfigError, masked_mean_pool

#: ONNX opset of the exports (GridSample needs 16, RoiAlign's half_pixel mode 16).
OPSET = 17
TWO_STAGE_INPUTS = ('images', 'image_sizes', 'box_scale')
DETR_INPUTS = ('images', 'image_sizes', 'scale_factors')
OUTPUTS = ('boxes', 'scores', 'labels', 'image_index')


def batched_nms_keep(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by NMS within each group, by decreasing score: mmcv's ``batched_nms``
    (boxes of different groups offset apart, one NMS), in ONNX-exportable ops.

    Args:
        boxes: (n, 4) x1, y1, x2, y2 (clipped, >= 0); scores: (n,); groups: (n,) long, e.g.
            class or level. n may be 0.
    """
    largest = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()  # 0 when n = 0
    offsets = groups.to(boxes) * (largest + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def clip_boxes(boxes: Tensor, image_size: Tensor) -> Tensor:
    """(n, 4) boxes clamped to [0, w] x [0, h]; ``image_size``: (2,) long (h, w)."""
    size = image_size.to(boxes)
    upper = torch.stack([size[1], size[0], size[1], size[0]])
    return torch.minimum(boxes.clamp(min=0), upper)


class MMDetONNXModel(nn.Module):
    """Exportable tensor forward of an MMDetection detector (see the module docstring).

    Supported: ``TwoStageDetector`` with a single-stage ``StandardRoIHead`` (Faster R-CNN, its
    HI-MoE ``InstanceMoERoIHead``), and ``DINO`` (and ``HIMoEDINO``). Cascade and mask heads
    are refused with an error naming ``model.roi_head.type``.

    Args:
        detector: the detector, in eval mode, on the CPU.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if isinstance(detector, DINO):
            self.kind = 'dino'
        elif isinstance(detector, TwoStageDetector):
            roi_head = detector.roi_head
            if not isinstance(roi_head, StandardRoIHead) or roi_head.with_mask:
                raise MoEConfigError(
                    'model.roi_head.type', type(roi_head).__name__,
                    'the MMDetection ONNX export covers single-stage box heads (Faster R-CNN '
                    'and its HI-MoE InstanceMoERoIHead); cascade and mask heads are not exported')
            self.kind = 'two_stage'
        else:
            raise MoEConfigError('model.type', type(detector).__name__,
                                 'the MMDetection ONNX export covers Faster R-CNN and DINO '
                                 '(dense or HI-MoE)')
        self.detector = detector
        self.scene_routed = hasattr(getattr(detector, 'roi_head', None), 'scene_featmap_strides')

    @property
    def input_names(self) -> Tuple[str, ...]:
        return TWO_STAGE_INPUTS if self.kind == 'two_stage' else DETR_INPUTS

    def forward(self, images: Tensor, image_sizes: Tensor, scale: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections of a batch (see the module docstring); ``scale`` is ``box_scale`` for
        Faster R-CNN and ``scale_factors`` for DINO."""
        if self.kind == 'two_stage':
            per_image = self._two_stage(images, image_sizes, scale)
        else:
            per_image = self._dino(images, image_sizes, scale)
        boxes, scores, labels = (torch.cat(parts) for parts in zip(*per_image))
        image_index = torch.cat([torch.full_like(s, i, dtype=torch.long)
                                 for i, (_, s, _) in enumerate(per_image)])
        return boxes, scores, labels, image_index

    # ---- Faster R-CNN ----

    def _two_stage(self, images: Tensor, image_sizes: Tensor, box_scale: Tensor
                   ) -> List[Tuple[Tensor, Tensor, Tensor]]:
        detector = self.detector
        feats = detector.extract_feat(images)
        rpn_head = detector.rpn_head
        cls_scores, bbox_preds = rpn_head(feats)
        priors = rpn_head.prior_generator.grid_priors(
            [score.shape[-2:] for score in cls_scores], dtype=feats[0].dtype,
            device=feats[0].device)
        proposals = [self._proposals([s[b] for s in cls_scores], [d[b] for d in bbox_preds],
                                     priors, image_sizes[b]) for b in range(images.shape[0])]
        rois = torch.cat([torch.cat([torch.full_like(p[:, :1], b), p], dim=1)
                          for b, p in enumerate(proposals)])
        roi_head = detector.roi_head
        roi_feats = self._roi_features(feats, rois)
        if self.scene_routed:
            scene = self._scene_features(feats, image_sizes)
            cls_score, bbox_pred, _ = roi_head.bbox_head(roi_feats, scene, rois[:, 0].long())
        else:
            cls_score, bbox_pred = roi_head.bbox_head(roi_feats)
        results = []
        start = torch.zeros((), dtype=torch.long)
        for b, image_proposals in enumerate(proposals):
            end = start + torch._shape_as_tensor(image_proposals)[0]
            results.append(self._rcnn_detections(
                image_proposals, cls_score[start:end], bbox_pred[start:end], image_sizes[b],
                box_scale[b]))
            start = end
        return results

    def _proposals(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor],
                   priors: Sequence[Tensor], image_size: Tensor) -> Tensor:
        """(p, 4) RPN proposals of one image, as ``RPNHead.predict_by_feat`` (rescale=False).

        Args:
            cls_scores / bbox_preds: per level, the image's (A, H_l, W_l) / (4A, H_l, W_l).
            priors: per level, (H_l * W_l * A, 4) anchors.
            image_size: (2,) long (h, w).
        """
        rpn_head = self.detector.rpn_head
        cfg = rpn_head.test_cfg
        nms_pre = cfg.get('nms_pre', -1)
        scores, deltas, anchors, levels = [], [], [], []
        for level, (cls_score, bbox_pred, level_priors) in enumerate(
                zip(cls_scores, bbox_preds, priors)):
            level_deltas = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
            logits = cls_score.permute(1, 2, 0).reshape(-1, rpn_head.cls_out_channels)
            level_scores = (logits.sigmoid() if rpn_head.use_sigmoid_cls
                            else logits.softmax(-1)[:, :-1]).reshape(-1)
            if nms_pre > 0:  # sorted as mmdet sorts (the order of equal scores matters to NMS)
                level_scores, index = level_scores.sort(descending=True)
                level_scores, index = level_scores[:nms_pre], index[:nms_pre]
                level_deltas, level_priors = level_deltas[index], level_priors[index]
            scores.append(level_scores)
            deltas.append(level_deltas)
            anchors.append(level_priors)
            levels.append(torch.full_like(level_scores, level, dtype=torch.long))
        coder = rpn_head.bbox_coder
        boxes = clip_boxes(delta2bbox(torch.cat(anchors), torch.cat(deltas), coder.means,
                                      coder.stds, None), image_size)
        scores, levels = torch.cat(scores), torch.cat(levels)
        min_size = cfg.get('min_bbox_size', -1)
        if min_size >= 0:
            valid = ((boxes[:, 2] - boxes[:, 0] > min_size)
                     & (boxes[:, 3] - boxes[:, 1] > min_size)).nonzero().squeeze(1)
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        keep = batched_nms_keep(boxes, scores, levels, cfg.nms.iou_threshold)
        return boxes[keep[:cfg.max_per_img]]

    def _roi_features(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        """(n, C, s, s) RoIAlign features, as the RoI head's ``SingleRoIExtractor``: every RoI
        pooled from its one FPN level only."""
        extractor = self.detector.roi_head.bbox_roi_extractor
        num_levels = extractor.num_inputs
        out_size = extractor.roi_layers[0].output_size
        levels = extractor.map_roi_levels(rois, num_levels)
        roi_feats = feats[0].new_zeros(rois.shape[0], extractor.out_channels, *out_size)
        for level in range(num_levels):
            layer = extractor.roi_layers[level]
            if getattr(layer, 'pool_mode', 'avg') != 'avg':
                raise MoEConfigError('model.roi_head.bbox_roi_extractor.roi_layer.pool_mode',
                                     layer.pool_mode, "the ONNX export pools with 'avg'")
            index = (levels == level).nonzero().squeeze(1)
            pooled = roi_align(feats[level], rois[index], out_size,
                               spatial_scale=layer.spatial_scale,
                               sampling_ratio=layer.sampling_ratio, aligned=layer.aligned)
            roi_feats = roi_feats.index_copy(0, index, pooled)
        return roi_feats

    def _scene_features(self, feats: Sequence[Tensor], image_sizes: Tensor) -> Tensor:
        """(B, C) each image's neck features averaged over its unpadded area, then over levels
        (the HI-MoE RoI head's ``scene_features``, with the sizes as tensors)."""
        strides = self.detector.roi_head.scene_featmap_strides
        return masked_mean_pool(feats[:len(strides)], strides, list(image_sizes))

    def _rcnn_detections(self, proposals: Tensor, cls_score: Tensor, bbox_pred: Tensor,
                         image_size: Tensor, box_scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One image's detections, as ``BBoxHead._predict_by_feat_single`` (rescale=True)."""
        bbox_head = self.detector.roi_head.bbox_head
        cfg = self.detector.roi_head.test_cfg
        if bbox_head.custom_cls_channels:
            raise MoEConfigError('model.roi_head.bbox_head.loss_cls', bbox_head.loss_cls,
                                 'the ONNX export supports softmax classification scores')
        scores = cls_score.softmax(dim=-1)
        num_classes = bbox_head.num_classes
        per_roi = 1 if bbox_head.reg_class_agnostic else num_classes
        coder = bbox_head.bbox_coder
        boxes = delta2bbox(proposals.repeat_interleave(per_roi, dim=0), bbox_pred.view(-1, 4),
                           coder.means, coder.stds, None)
        boxes = clip_boxes(boxes, image_size) * box_scale.repeat(2)
        boxes = boxes.view(-1, per_roi, 4).expand(-1, num_classes, 4).reshape(-1, 4)
        labels = torch.arange(num_classes, device=scores.device).expand(scores.shape[0], num_classes).reshape(-1)
        scores = scores[:, :-1].reshape(-1)
        valid = (scores > cfg.score_thr).nonzero().squeeze(1)
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        keep = batched_nms_keep(boxes, scores, labels, cfg.nms.iou_threshold)[:cfg.max_per_img]
        return boxes[keep], scores[keep], labels[keep]

    # ---- DINO ----

    def _dino(self, images: Tensor, image_sizes: Tensor, scale_factors: Tensor
              ) -> List[Tuple[Tensor, Tensor, Tensor]]:
        detector = self.detector
        feats = detector.extract_feat(images)
        height, width = images.shape[-2:]
        samples = [DetDataSample(metainfo=dict(batch_input_shape=(height, width),
                                               img_shape=(height, width)))
                   for _ in range(images.shape[0])]
        head_inputs = detector.forward_transformer(feats, samples)
        if isinstance(head_inputs, tuple):  # HI-MoE: (head inputs, routings)
            head_inputs = head_inputs[0]
        cls_scores, bbox_preds = detector.bbox_head(head_inputs['hidden_states'],
                                                    head_inputs['references'])
        head = detector.bbox_head
        max_per_img = head.test_cfg.get('max_per_img', cls_scores.shape[2])
        results = []
        for b in range(images.shape[0]):
            cls_score, bbox_pred = cls_scores[-1][b], bbox_preds[-1][b]
            if head.loss_cls.use_sigmoid:
                top = cls_score.sigmoid().view(-1).topk(max_per_img)
                scores = top.values
                labels = top.indices % head.num_classes
                query = torch.div(top.indices, head.num_classes, rounding_mode='floor')
            else:
                best = cls_score.softmax(dim=-1)[..., :-1].max(-1)
                top = best.values.topk(max_per_img)
                scores, query = top.values, top.indices
                labels = best.indices[query]
            boxes = bbox_cxcywh_to_xyxy(bbox_pred[query])
            size = image_sizes[b].to(boxes)
            whwh = torch.stack([size[1], size[0], size[1], size[0]])
            boxes = clip_boxes(boxes * whwh, image_sizes[b]) / scale_factors[b].repeat(2)
            results.append((boxes, scores, labels))
        return results


def export_onnx(detector: nn.Module, sample: Dict[str, Tensor], path: Union[str, Path],
                dynamic_size: bool = True, opset: int = OPSET) -> Path:
    """Export ``detector`` (eval mode, CPU) to ``path`` with the TorchScript-based exporter.

    Args:
        detector: a Faster R-CNN or DINO detector (dense or HI-MoE).
        sample: the export inputs by name (``images``, ``image_sizes`` and ``box_scale`` or
            ``scale_factors``, see ``prepare_inputs``); the batch size is fixed to the sample's.
        dynamic_size: height and width of ``images`` are dynamic axes (else fixed).
    """
    model = MMDetONNXModel(detector).eval()
    args = tuple(sample[name] for name in model.input_names)
    dynamic_axes = {name: {0: f'num_{name}'} for name in OUTPUTS}
    if dynamic_size:
        dynamic_axes['images'] = {2: 'height', 3: 'width'}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(model.input_names), output_names=list(OUTPUTS),
                          dynamic_axes=dynamic_axes)
    return path


def prepare_inputs(detector: nn.Module, pipeline: Sequence[dict],
                   image_paths: Sequence[Union[str, Path]]) -> Tuple[Dict[str, Tensor], dict]:
    """Run the config's test pipeline and the detector's data preprocessor on images.

    Args:
        detector: the detector (its ``data_preprocessor`` pads and normalises).
        pipeline: the config's test pipeline (annotation loading is dropped).
        image_paths: the images of one batch.

    Returns:
        the graph inputs by name (``images``, ``image_sizes``, ``box_scale``,
        ``scale_factors``) and the preprocessed batch for ``detector.test_step``.
    """
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate

    steps = Compose([dict(step) for step in pipeline if step['type'] != 'LoadAnnotations'])
    samples = [steps(dict(img_path=str(p), img_id=i)) for i, p in enumerate(image_paths)]
    batch = pseudo_collate(samples)
    with torch.no_grad():
        processed = detector.data_preprocessor(batch, False)
    metas = [s.metainfo for s in processed['data_samples']]
    inputs = dict(
        images=processed['inputs'].float().contiguous(),
        image_sizes=torch.tensor([m['img_shape'][:2] for m in metas], dtype=torch.long),
        box_scale=torch.tensor([[1 / s for s in m['scale_factor']] for m in metas]),
        scale_factors=torch.tensor([list(m['scale_factor']) for m in metas]))
    return inputs, batch


def eager_detections(detector: nn.Module, batch: dict) -> List[Dict[str, Tensor]]:
    """The detector's own predictions (``test_step``: rescaled to the original images), as
    per-image dicts of ``boxes``, ``scores``, ``labels``."""
    with torch.no_grad():
        samples = detector.test_step(batch)
    return [dict(boxes=s.pred_instances.bboxes, scores=s.pred_instances.scores,
                 labels=s.pred_instances.labels) for s in samples]


def inference_pipeline(cfg) -> List[dict]:
    """The test pipeline of an MMDetection config."""
    dataset = cfg.test_dataloader.dataset
    while 'pipeline' not in dataset:  # wrappers (e.g. RepeatDataset) hold the real dataset
        dataset = dataset.dataset
    return list(dataset.pipeline)


def load_detector(config: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None,
                  cfg_options: Optional[dict] = None, seed: int = 0) -> Tuple[nn.Module, object]:
    """Build a detector from an MMDetection config (``custom_imports`` honoured) on the CPU in
    eval mode; load ``checkpoint`` if given, else initialise it (``init_weights``, seeded).
    Returns the detector and the config."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(seed)
    detector = MODELS.build(cfg.model)
    if checkpoint is None:
        detector.init_weights()
    else:
        load_checkpoint(detector, str(checkpoint), map_location='cpu')
    return detector.eval(), cfg
