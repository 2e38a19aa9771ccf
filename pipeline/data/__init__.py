"""Data: dataset specs, source readers, image shards (`gendd prepare`) and the crop views every later stage replays."""
