"""Human-readable outputs: plots (PNG) now; the HTML report and heatmaps build on these."""
