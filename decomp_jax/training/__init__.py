"""Floor 4, training: ``losses`` (classification, regression, the causal-LM response losses) <
``train`` (``TrainState``, optimizers, the jitted train and eval steps, sharded states) <
``checkpoint`` (Orbax adapter-only checkpoints, fingerprints, resume).

May import: floors 0-3.
"""
