"""The lab: what measures mabn and reproduces the paper's tables, beside the trainer.

- :mod:`mabn.lab.bench`    round-robin timing, allocator and kernel settings of the benchmark scripts
- :mod:`mabn.lab.studies`  the paper's tables: which presets make each row, the paper's numbers, the claims
- :mod:`mabn.lab.collect`  a study's runs -> results table (scripts/collect_results.py)

It may import :mod:`mabn.engine` (the machine description, configs); the engine never imports it.
"""
