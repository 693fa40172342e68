"""Scaling-law sweeps: plan, run, collect, fit and plot (``jaxformer sweep``)."""
