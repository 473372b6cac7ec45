"""Recipes of fewstep-video (entry points in pyproject)."""
