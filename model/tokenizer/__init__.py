"""The project's fast tokenizer: building, training, saving and loading it (build), and corpus counting (counting)."""
