"""The ImageNet training engine of mabn (pycls-style: one concern per module).

- :mod:`mabn.engine.config`       structured config (dataclasses), its validation, what a resume must repeat
- :mod:`mabn.engine.registry`     the architectures and normalization layers a config may name
- :mod:`mabn.engine.distributed`  torchrun / single-process set-up and collectives
- :mod:`mabn.engine.data`         datasets, augmentation, resumable samplers, loaders
- :mod:`mabn.engine.models`       ResNet builders, initialization, normalization conversion
- :mod:`mabn.engine.meters`       top-k error, timers, the evaluation loop
- :mod:`mabn.engine.checkpoint`   atomic checkpoints, keep-last-K, corruption fallback
- :mod:`mabn.engine.run`          run directory: logging, lock, metrics.json, provenance
- :mod:`mabn.engine.files`        atomic writes (temporary file + rename, no temporary left on failure)
- :mod:`mabn.engine.trainer`      the training loop itself
- :mod:`mabn.engine.compiling`    torch.compile: availability, options, known miscompilations
- :mod:`mabn.engine.machine`      the CPU model and instruction set recorded with every run and figure
- :mod:`mabn.engine.evaluation`   evaluation of a checkpoint (eval.py)

The benchmarks, studies and result collection live in :mod:`mabn.lab`, which may import the
engine; the engine never imports the lab.

It needs the ``train`` extra (``pip install mabn[train]``).

It may use OmegaConf but never Hydra (Hydra lives in the top-level scripts only), and the layer
library (:mod:`mabn`) does not import it.
"""
