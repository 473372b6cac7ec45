"""Domain-agnostic distillation core: paths, denoisers, samplers, objectives, trainer,
metrics, CLI."""
