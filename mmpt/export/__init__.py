"""Export targets: a trained mmpt model -> the formats other libraries load (one module each)."""
