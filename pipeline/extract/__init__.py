"""Extraction (`gendd extract`): the teacher run on K views of every sample into the cache; the replay verifying it."""
