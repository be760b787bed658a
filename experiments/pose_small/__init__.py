"""The small reproduction of the PoSE paper's comparison on CPU (examples/reproduce_small.sh).

- synthetic.py   synthetic passkey-style retrieval documents for pretraining and extension
- reproduce.py   the driver: data, pretraining, extensions, evaluation, report (stages cached)
"""
