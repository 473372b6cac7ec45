"""``fewstep distill lidar-*`` recipes (entry points in the package's pyproject)."""
