"""Checks of an export against the PyTorch model: validation on new shapes, and the accuracy report."""
