"""Training infrastructure shared by the trainers: distributed helpers, DeepSpeed engine and
crash-safe checkpoints (:mod:`llm2clip.train.distributed`, :mod:`llm2clip.train.checkpoint`)."""
