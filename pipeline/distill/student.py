"""An exported student read back: the timm network, its generative head and probe input, in eval mode."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from pipeline.distill.head import GenerativeHead, HeadConfig
from pipeline.models import load_model
from pipeline.train.student import Student


def load_student(out: str | Path) -> tuple[Student, dict]:
    """The exported student with its generative head (if it has one), in eval mode."""
    out = Path(out)
    net, card = load_model(out, "student")
    head = None
    if card["extra"].get("head"):
        head = GenerativeHead(HeadConfig(**card["extra"]["head"]))
        head.load_state_dict(load_file(str(out / "head.safetensors")))
    return Student(net, head, None, probe_on_condition=card["extra"].get("probe_input") == "condition").eval(), card
