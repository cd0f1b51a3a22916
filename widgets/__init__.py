"""Views for lens runs: anywidget components, plotly figures, the Panel app."""
