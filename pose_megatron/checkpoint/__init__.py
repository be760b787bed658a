"""Checkpoints: Megatron-LM's directory layout and training state, and Hugging Face conversion.

    layout.py          directory convention, tracker, RunConfig (pose_config.json)
    megatron_io.py     model weights in dist checkpoints (save_sharded, load_model_weights)
    training_state.py  full training checkpoints (optimizer, schedule, RNG, progress)
    megatron_args.py   Megatron-LM's `args` namespace <-> configs (what stock Megatron-LM reads)
    saved_state.py     a checkpoint's common state, read before any process group (who wrote it)
    resume_checks.py   what a resume can load, else the flag to pass
    optimizer_state.py the distributed optimizer's load faults without Apex / TE, handled
    vocab_padding.py   load-time check of a checkpoint's vocabulary padding at this TP
    families.py        one record per Hugging Face model family (FAMILIES), detection, lookups
    megatron_keys.py   dist-checkpoint keys and global shapes (the same for every family)
    weights.py         HF <-> megatron tensor layouts (QKV fuse / split, padding, import pieces)
    hf_rope.py         RoPE scaling <-> config.json
    hf_arch.py         architecture <-> config.json
    hf_io.py           reading HF weight files, writing safetensors shards, tokenizer files
    dcp_stream.py      one-process dist-checkpoint streaming (writer and chunk reader)
    hf_import.py       convert_hf_to_megatron
    hf_export.py       convert_megatron_to_hf
    errors.py          ConversionError and how the tools report it
"""
