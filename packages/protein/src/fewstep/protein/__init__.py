"""Protein-backbone distillation: few-step backbone generators."""
