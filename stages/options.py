"""Help texts of the options several stages share (one wording, one default)."""

from __future__ import annotations

DATA_HELP = (
    "auto",
    "Input mode: memory (the whole split in RAM, fastest for small sets), stream (shards read per epoch, memory "
    "flat in the dataset size), or auto (estimates the footprint, prints it and picks).",
)
WORKERS_HELP = "Stream mode: data loader processes (-1 = auto: the cores beyond two, at least 1, up to 8)."
BUFFER_HELP = "Stream mode: samples each loader worker shuffles among (memory ~ buffer x one decoded sample)."
