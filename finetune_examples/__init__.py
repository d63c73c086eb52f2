"""Downstream fine-tuning examples built on the project trainer."""
