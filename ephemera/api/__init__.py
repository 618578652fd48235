"""The CRD contract: the PreviewEnvironment's models and phases, its names, labels and annotations."""
