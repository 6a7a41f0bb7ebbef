"""Lightning face of VoxelOpt: the pair DataModules and the registration LightningModule.

``voxelopt/`` never imports Lightning; everything that does lives here, in ``train.py`` and in
``eval.py``.
"""
