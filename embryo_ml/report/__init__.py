"""Human-readable outputs: plots (PNG), augmentation previews and the HTML scoring report."""
