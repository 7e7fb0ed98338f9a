"""The pieces of ``scripts/gpu_record.py`` (the GPU record): shared settings and set-up
(``common``), the carry folder (``pack``), grids and the probe (``probe``), the time estimates and
budget cuts (``plan``) and the parts that run (``parts``)."""
