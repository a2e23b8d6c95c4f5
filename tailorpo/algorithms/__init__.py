"""Each method's rollout (what it samples) and learner (how it learns from it)."""
