"""Hugging Face <-> Megatron checkpoint mapping: configs, weight names, QKV / gate-up fusing, sharding."""
