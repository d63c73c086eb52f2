"""Training: the one loop (engine), its objectives seq2seq (trainer) and DPO (dpo), metrics and plots."""
