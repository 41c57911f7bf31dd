"""Checkpoint import/export: OpenAI (TorchScript read as data), OpenCLIP, HF transformers, duomo's own.

Loading is safe: safetensors, `torch.load(weights_only=True)`, or a restricted reader of TorchScript archives;
nothing a checkpoint contains is ever executed.
"""

from duomo.io.checkpoint import (
    detect_format,
    export,
    load_into,
    load_model,
    read_checkpoint,
    resolve_hub,
    with_activation,
)
from duomo.io.hf import duomo_to_hf, export_hf, hf_to_duomo, read_hf
from duomo.io.native import load_native, save_native
from duomo.io.openai import read_torchscript
from duomo.io.openclip import (
    duomo_config_to_openclip,
    duomo_to_openclip,
    infer_openclip_config,
    openclip_config_to_duomo,
    openclip_to_duomo,
)

__all__ = [
    "detect_format",
    "duomo_config_to_openclip",
    "duomo_to_hf",
    "duomo_to_openclip",
    "export",
    "export_hf",
    "hf_to_duomo",
    "infer_openclip_config",
    "load_into",
    "load_model",
    "load_native",
    "openclip_config_to_duomo",
    "openclip_to_duomo",
    "read_checkpoint",
    "read_hf",
    "read_torchscript",
    "resolve_hub",
    "save_native",
    "with_activation",
]
