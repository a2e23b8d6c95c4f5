"""Small models for tests and CPU runs, built from the same classes as the real ones (tiny-sd, tiny-sdxl,
tiny-shapes), and the CLIP tokenizer files they share with the tiny reward models."""
