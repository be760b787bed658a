"""Experiments built on the pose_megatron library (which never imports them)."""
