"""Preference-pair data for the offline objectives: reading, CLIP embeddings."""
