"""torchvision Mask R-CNN and RetinaNet around a PVT(-GRC)-FPN backbone, aligned with PVT's mmdetection configs.

Backbone: ``timm.create_model(<pvt name>, features_only=True)`` (any registered PVT / PVT-GRC model):
stage maps at strides 4/8/16/32 (64/128/320/512 channels for PVT v1), no final norm, stage 4 without
the class token (as PVT's detection backbone), position embeddings resized to each input's grid by the
model, GRC caches kept at their ImageNet length (``img_size``, 224; stage 4: the 7 x 7 grid's 49) with
detection-size token sequences resized to it by the GRC layer.

FPN (256 channels, 5 levels), as PVT's configs:

* Mask R-CNN: C2-C5 -> P2-P5, P6 = max-pool(P5, 1, stride 2) (torchvision's ``LastLevelMaxPool``);
* RetinaNet: C3-C5 -> P3-P5, P6 = stride-2 3x3 conv on C5, P7 = stride-2 3x3 conv on P6 with no ReLU
  in between (:class:`P6P7FromC5`; torchvision's ``LastLevelP6P7`` puts a ReLU before P7).

Aligned torchvision defaults (docs/detection.md lists them and what is kept):
RPN post-NMS top-n 1000 in training; RoIAlign ``sampling_ratio=0`` and ``aligned=True``
(:class:`AlignedMultiScaleRoIAlign`); RPN box loss L1 (:class:`L1RegionProposalNetwork`); anchors not
rounded to integers (:class:`FloatAnchorGenerator`), RetinaNet's 4 x stride x 2^(k/3); RetinaNet 100
detections per image; contiguous labels.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from tasks.common.errors import ConfigError
from tasks.common.models import registered_models

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETECTORS = ("maskrcnn", "retinanet")


class P6P7FromC5(ExtraFPNBlock):
    """RetinaNet's extra levels as mmdetection ``add_extra_convs='on_input'``: P6 = conv(C5), P7 = conv(P6), no ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[torch.Tensor], x: list[torch.Tensor], names: list[str]
                ) -> tuple[list[torch.Tensor], list[str]]:
        p6 = self.p6(x[-1])
        p7 = self.p7(p6)
        return results + [p6, p7], names + ["p6", "p7"]


class PVTFPN(nn.Module):
    """A timm feature backbone + FPN; ``out_channels`` for torchvision's detectors, returns an ordered dict."""

    def __init__(self, backbone: nn.Module, in_indices: Sequence[int], extra: ExtraFPNBlock, out_channels: int = 256):
        super().__init__()
        self.body = backbone
        self.in_indices = list(in_indices)
        channels = backbone.feature_info.channels()
        self.fpn = FeaturePyramidNetwork([channels[i] for i in self.in_indices], out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.in_indices)))


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with ``roi_align(..., aligned=True)`` (mmdetection's RoIAlign); level mapping unchanged."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio, aligned=True)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


class FloatAnchorGenerator(AnchorGenerator):
    """torchvision's anchors without rounding the base anchors to integers: mmdetection's anchors
    (center offset 0, w = size / sqrt(ratio), h = size * sqrt(ratio)) exactly."""

    def generate_anchors(self, scales: list[float], aspect_ratios: list[float], dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales_t[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales_t[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with mmdetection's L1 box loss (torchvision: smooth L1, beta 1/9)."""

    def compute_loss(self, objectness: torch.Tensor, pred_bbox_deltas: torch.Tensor, labels: list[torch.Tensor],
                     regression_targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled_neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([sampled_pos, sampled_neg], dim=0)
        objectness = objectness.flatten()
        labels_t = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[sampled_pos], targets[sampled_pos], reduction="sum") / sampled.numel()
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels_t[sampled])
        return obj_loss, box_loss


def build_backbone(model_cfg: Mapping[str, Any], grc_cfg: Mapping[str, Any] | None) -> nn.Module:
    """``timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), img_size, drop_path_rate, [grc])``."""
    import timm

    cfg = dict(model_cfg)
    name = str(cfg.pop("name"))
    if name not in registered_models():
        raise ConfigError(f"Unknown model '{name}' for detection; use a PVT backbone such as model=pvt_tiny or "
                          f"model=pvt_tiny_grc.")
    kwargs = dict(cfg.pop("kwargs", None) or {})
    pretrained = cfg.pop("pretrained", None)
    kwargs.update({k: v for k, v in cfg.items() if v is not None and k in ("drop_path_rate", "img_size", "drop_rate",
                                                                             "attn_drop_rate")})
    if name.endswith("_grc"):
        kwargs["grc"] = dict(grc_cfg) if grc_cfg is not None else None
    try:
        net = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3), **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise ConfigError(f"Model '{name}' cannot give multi-scale features for detection ({exc}); use a PVT "
                          f"backbone such as model=pvt_tiny or model=pvt_tiny_grc.") from None
    if list(net.feature_info.reduction()) != [4, 8, 16, 32]:
        raise ConfigError(f"Model '{name}' gives features at strides {list(net.feature_info.reduction())}; detection "
                          f"needs four levels at strides 4/8/16/32 (a pyramid backbone such as model=pvt_tiny).")
    init_backbone(net, pretrained)
    return net


def init_backbone(net: nn.Module, pretrained: str | Mapping[str, Any] | None) -> Any:
    """``model.pretrained`` for a detection backbone: the ImageNet weights (this project's ``.ckpt``, EMA
    weights when present, or a plain / official PVT state_dict) loaded strictly into the feature extractor
    (the classifier head, final norm and class token it pruned are left out), every GRC cache reset to zeros (the
    paper's rule); a cached backbone may start from its baseline's weights (GRC parts at their
    initialisation, logged by the library). Returns the library's report (None without a file)."""
    from cached_transformers import grc_layers

    from tasks.common.models import load_pretrained

    layers = grc_layers(net)
    if not pretrained:
        log.warning("Detection backbone starts from random weights (model.pretrained=null); the paper initialises "
                    "it from the ImageNet model: pass model.pretrained=/path/to/imagenet/best.ckpt.")
        return None
    options = dict(pretrained) if isinstance(pretrained, Mapping) else {"path": str(pretrained)}
    options.setdefault("reset_cache", True)
    report = load_pretrained(net, options)  # a deeper model's file (extra blocks) is the library's error
    zero = sum(1 for layer in layers.values() if not bool(layer.cache.abs().sum()))
    log.info("Detection backbone initialised from %s: %d tensors loaded; %d GRC layers, caches zero in %d (at "
             "their ImageNet length), %d GRC tensors left at their initialisation.", options["path"],
             len(report.loaded), len(layers), zero, len(report.grc_initialised))
    return report


def retinanet_anchor_sizes(octave_base_scale: float = 4.0, scales_per_octave: int = 3,
                           strides: Sequence[int] = (8, 16, 32, 64, 128)) -> tuple[tuple[float, ...], ...]:
    """mmdetection's RetinaNet anchor sizes: octave_base_scale x stride x 2^(k / scales_per_octave), exact floats."""
    return tuple(tuple(octave_base_scale * s * 2 ** (k / scales_per_octave) for k in range(scales_per_octave))
                 for s in strides)


def build_detector(detector: str, num_classes: int, model_cfg: Mapping[str, Any], grc_cfg: Mapping[str, Any] | None,
                   det_cfg: Mapping[str, Any], min_size: int = 800, max_size: int = 1333) -> nn.Module:
    """Mask R-CNN (``num_classes`` + background) or RetinaNet (``num_classes``) on a PVT-FPN backbone.

    ``det_cfg``: the ``task.detector`` section (head settings, defaults = PVT's mmdetection configs).
    """
    if detector not in DETECTORS:
        raise ConfigError(f"task.detector.type must be one of {DETECTORS}, got {detector!r}.")
    d = dict(det_cfg)
    body = build_backbone(model_cfg, grc_cfg)
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(d.get("image_mean", IMAGENET_MEAN)),
                  image_std=list(d.get("image_std", IMAGENET_STD)), size_divisible=int(d.get("size_divisible", 32)))
    fpn_channels = int(d.get("fpn_channels", 256))
    if detector == "maskrcnn":
        backbone = PVTFPN(body, (0, 1, 2, 3), LastLevelMaxPool(), fpn_channels)
        names = ["0", "1", "2", "3"]
        sampling = int(d.get("roi_sampling_ratio", 0))
        rpn_anchors = FloatAnchorGenerator(((32.0,), (64.0,), (128.0,), (256.0,), (512.0,)), ((0.5, 1.0, 2.0),) * 5)
        model = MaskRCNN(
            backbone, num_classes=num_classes + 1, **common, rpn_anchor_generator=rpn_anchors,
            rpn_pre_nms_top_n_train=int(d.get("rpn_pre_nms_top_n_train", 2000)),
            rpn_pre_nms_top_n_test=int(d.get("rpn_pre_nms_top_n_test", 1000)),
            rpn_post_nms_top_n_train=int(d.get("rpn_post_nms_top_n_train", 1000)),
            rpn_post_nms_top_n_test=int(d.get("rpn_post_nms_top_n_test", 1000)),
            box_roi_pool=AlignedMultiScaleRoIAlign(names, 7, sampling),
            mask_roi_pool=AlignedMultiScaleRoIAlign(names, 14, sampling),
            box_score_thresh=float(d.get("score_thresh", 0.05)), box_nms_thresh=float(d.get("nms_thresh", 0.5)),
            box_detections_per_img=int(d.get("detections_per_img", 100)),
            box_batch_size_per_image=int(d.get("box_batch_size_per_image", 512)))
        rpn = model.rpn
        model.rpn = L1RegionProposalNetwork(
            rpn.anchor_generator, rpn.head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=int(d.get("rpn_batch_size_per_image", 256)),
            positive_fraction=0.5, pre_nms_top_n=dict(rpn._pre_nms_top_n), post_nms_top_n=dict(rpn._post_nms_top_n),
            nms_thresh=rpn.nms_thresh, score_thresh=rpn.score_thresh)
        return model
    backbone = PVTFPN(body, (1, 2, 3), P6P7FromC5(body.feature_info.channels()[3], fpn_channels), fpn_channels)
    anchors = FloatAnchorGenerator(retinanet_anchor_sizes(), ((0.5, 1.0, 2.0),) * 5)
    return RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors, **common,
                     score_thresh=float(d.get("score_thresh", 0.05)), nms_thresh=float(d.get("nms_thresh", 0.5)),
                     detections_per_img=int(d.get("detections_per_img", 100)),
                     topk_candidates=int(d.get("topk_candidates", 1000)))


__all__ = ["AlignedMultiScaleRoIAlign", "FloatAnchorGenerator", "L1RegionProposalNetwork", "P6P7FromC5", "PVTFPN", "build_backbone",
           "build_detector", "retinanet_anchor_sizes"]
