"""What the operator and the model file say: the config, its units, the GGUF header, the generated demo model."""
