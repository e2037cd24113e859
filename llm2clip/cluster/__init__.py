"""The cluster layer: where a stage runs (Kubernetes, Kubeflow Trainer). The stages never import it."""
