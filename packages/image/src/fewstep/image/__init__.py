"""Image distillation: diffusers teachers and students, digits recipe."""
