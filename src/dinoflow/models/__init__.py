"""Backbones: a registry over timm (ViT /14 DINOv2 shapes, XCiT, tiny CPU shapes), a wrapper with a
mask-token path, and the shared export format (safetensors + JSON)."""

from dinoflow.models.backbone import Backbone, create_backbone
from dinoflow.models.export import export_backbone, load_backbone
from dinoflow.models.registry import BACKBONES, get_entry

__all__ = ["BACKBONES", "Backbone", "create_backbone", "export_backbone", "get_entry", "load_backbone"]
