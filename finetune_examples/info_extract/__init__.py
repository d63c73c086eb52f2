"""Downstream fine-tuning: triple extraction (DuIE / SKE) through the project trainer."""
