"""The Ray runtime: sampler actors and a learner actor driven by one controller (``driver.py``).

The math stays in the core modules; ``workers.py`` holds the roles as plain classes (testable without Ray),
and only ``driver.py`` touches Ray.
"""
