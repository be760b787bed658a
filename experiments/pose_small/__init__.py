"""The small reproduction of the PoSE paper's comparison on CPU (examples/reproduce_small.sh).

- settings.py    the two scales (full, quick) and each extension method's training flags
- synthetic.py   synthetic passkey-style retrieval documents for pretraining and extension
- reproduce.py   the driver: data, pretraining, extensions, evaluation, report (stages cached)
- summary.py     summary.json, the Markdown tables and the figure
"""
