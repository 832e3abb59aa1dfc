"""Reporting: what finished runs and studies say, as tables (``arow report``), figures (``arow plot``)
and RobustBench's model-info format. Reads run folders; trains and attacks nothing."""
