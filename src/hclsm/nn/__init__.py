"""Neural building blocks shared by the models (encoders, slots, decoders, matching)."""
