"""Host memory policy: the sans-I/O model, host samples, and the control plane."""
