"""Reward model servers: one module per learned reward model, each with ``load(weights, tiny, device)``, and the
gRPC server core they all run behind (``server.py``).

``tailorpo.rewards.catalogue`` names these modules by ``"module:attr"`` strings and imports them only when a
reward is built or served: this package imports ``tailorpo``, never the reverse.
"""
