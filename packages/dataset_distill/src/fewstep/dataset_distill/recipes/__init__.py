"""Recipes of fewstep-dataset-distill, registered as ``data-<method>`` entry points."""
