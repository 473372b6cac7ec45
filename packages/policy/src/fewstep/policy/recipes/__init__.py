"""Recipes of fewstep-policy, registered as ``policy-<method>`` entry points."""
