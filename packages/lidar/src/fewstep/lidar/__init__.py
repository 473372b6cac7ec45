"""LiDAR distillation: preference-aligned scene completion, camera-from-LiDAR."""
