"""3-D distillation: score distillation into Gaussians and fields, volume distillation."""
