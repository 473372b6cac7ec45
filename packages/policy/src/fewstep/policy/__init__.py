"""Robot-policy distillation: streaming and few-step diffusion policies."""
