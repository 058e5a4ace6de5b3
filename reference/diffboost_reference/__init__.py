"""diffboost's reference models, kept apart from the runtime: the procedural shapes data
(:mod:`diffboost_reference.data`), the attribute evaluator and its metrics
(:mod:`diffboost_reference.evaluation`), and the trainers of the shipped models
(:mod:`diffboost_reference.training`, ``python -m diffboost_reference.training.train_flux``).

``import diffboost`` never imports this package; the bench and the benchmark scripts do.
"""
