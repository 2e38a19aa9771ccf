"""Distillation (`gendd distill`): GenDD's generative head and objectives, and the export of a distilled student."""
