"""Video distillation: consistency, sparse attention, streaming students."""
