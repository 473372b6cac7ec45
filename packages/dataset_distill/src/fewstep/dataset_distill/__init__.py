"""Dataset and graph distillation: synthetic data that trains models almost as well."""
