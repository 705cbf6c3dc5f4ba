"""dinoflow: a Kubeflow-native factory for self-supervised vision foundation models."""

__version__ = "0.1.0"
