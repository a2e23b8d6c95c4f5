"""Pure tensor math of the methods: the DDIM step and its log-probability, the objectives, guidance, ranking.

Imports torch only, so every formula can be tested on small tensors without a model."""
