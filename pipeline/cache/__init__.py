"""The feature cache: one reader and writer interface over two layouts (Zarr, WebDataset), codecs, integrity scan."""
