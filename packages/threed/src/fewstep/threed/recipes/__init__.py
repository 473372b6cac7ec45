"""Recipes of fewstep-threed, registered as ``threed-<method>`` entry points."""
