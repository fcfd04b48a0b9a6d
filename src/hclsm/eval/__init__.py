"""Evaluation of trained models against simulator ground truth."""
