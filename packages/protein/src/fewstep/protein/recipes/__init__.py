"""Recipes of fewstep-protein (entry points in the ``fewstep.recipes`` group)."""
