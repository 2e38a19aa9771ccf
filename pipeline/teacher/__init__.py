"""The teacher (`gendd teacher`): trained here with cross-entropy, or adopted from a checkpoint or timm weights."""
